"""Encode stage: decoded rows (uint8 frames) -> video embeddings and re-rank features, with any model family.

One :class:`EncodeFrames` per actor holds the model (:func:`pipeline.models.load_model`); Ray Data calls it on
numpy batches (dict of columns). Rows whose ``error`` is not ``None`` pass through with zero embeddings; rows
whose frames do not fit the model become error rows. Nothing in a batch makes the stage raise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from ...bf16 import warn_if_emulated
from ...flags import PRECISIONS, check_choice
from ...models import VideoTextModel, load_model
from ...storage import StorageOptions
from ..parallel import in_parallel

T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """The model source could not be loaded: missing, unreadable, or not a checkpoint of a known family."""


class EncodeFrames:
    """Ray Data callable: drops ``frames``, adds ``embedding``, ``prompt_features`` and ``model_id``.

    ``embedding`` is float32 ``(rows, P)``, L2-normalized; ``prompt_features`` (the re-rank features, only
    for a family that has them) float16 ``(rows, *rerank_shape)``; ``model_id`` is the identity's tag on
    every row. The model runs on ``device`` ("auto": CUDA if available, else CPU) in the dtype of
    ``precision`` (:func:`compute_dtype`), over sub-batches of at most ``batch_size`` videos.
    ``compiled``: the video side goes through ``torch.compile`` (:func:`compiled_encoder`), every sub-batch
    padded to ``batch_size`` so that one graph serves them all. ``threads``: the encoder's CPU threads in
    all, if given. ``lanes``: sub-batches encoded side by side on threads of their own, each on ``threads /
    lanes`` torch threads (:func:`~pipeline.embed.resources.encoder_lanes`; the caller sends ``lanes *
    batch_size`` rows a call). ``loaded`` is the model of ``model_src`` where the caller has it loaded
    already (the job's own process); the stage then moves it to its device and dtype.

    Attributes: ``identity`` (the hash is of the float32 weights as loaded, so CPU and GPU actors agree);
    ``frame_shape`` = the ``(T, crop, crop, 3)`` the model takes; ``embedding_dim`` and ``rerank_shape``.
    """

    def __init__(
        self,
        model_src: str | None,
        storage_options: StorageOptions | None = None,
        device: str = "auto",
        batch_size: int = 8,
        threads: int | None = None,
        loaded: VideoTextModel | None = None,
        compiled: bool = False,
        precision: str = "auto",
        lanes: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if lanes > 1 and compiled:
            raise ValueError("a compiled encoder runs one graph, one batch at a time: lanes must be 1")
        self.lanes = lanes
        if threads:
            torch.set_num_threads(threads // lanes)  # each lane its share
        try:
            model = loaded or load_model(model_src, storage_options)
            self.preprocessor = model.preprocessor
        except Exception as e:
            raise ModelLoadError(f"cannot load the model from {model_src!r}: {e}") from e
        self.identity = model.identity

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = compute_dtype(self.device, precision)
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            warn_if_emulated("the encoder", "0.16-0.33x", "bench/precision.py")
        self.model = model.to(self.device, self.dtype)
        self.batch_size = batch_size
        self.compiled = compiled
        self.encode_videos = self.model.encode_videos
        if compiled:
            self.encode_videos = compiled_encoder(self.encode_videos, self.device)

        height, width = self.preprocessor.crop_size
        self.frame_shape = (model.num_frames, height, width, 3)
        self.embedding_dim = model.embedding_dim
        self.rerank_shape = model.rerank_shape

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Encode the batch's good rows; see the class docstring for the columns."""
        errors = np.array(batch["error"], dtype=object)  # a copy: frame problems are added to it
        frames = batch["frames"]
        rows = len(errors)
        for i in range(rows):
            if errors[i] is None:
                errors[i] = self._check(frames[i])
        good = [i for i in range(rows) if errors[i] is None]
        embedding = np.zeros((rows, self.embedding_dim), np.float32)
        rerank = np.zeros((rows, *self.rerank_shape), np.float16) if self.rerank_shape else None
        chunks = [good[start : start + self.batch_size] for start in range(0, len(good), self.batch_size)]
        calls = ((lambda chunk=chunk: self._encode(np.stack([frames[i] for i in chunk]))) for chunk in chunks)
        encoded = in_parallel(calls, self.lanes, 0, name="encode") if self.lanes > 1 else (c() for c in calls)
        for chunk, (chunk_embedding, features) in zip(chunks, encoded, strict=True):
            embedding[chunk] = chunk_embedding
            if rerank is not None:
                rerank[chunk] = features
        out = {name: column for name, column in batch.items() if name != "frames"}
        out.update(error=errors, embedding=embedding, model_id=np.full(rows, self.identity.tag, dtype=object))
        if rerank is not None:
            out["prompt_features"] = rerank
        return out

    def _check(self, frames: Any) -> str | None:
        """Why ``frames`` cannot go into the model, or ``None`` if they can."""
        shape, dtype = tuple(getattr(frames, "shape", ())), getattr(frames, "dtype", type(frames).__name__)
        if shape == self.frame_shape and dtype == np.uint8:
            return None
        return (
            f"frames are {dtype} {shape}, the model takes uint8 {self.frame_shape} (frames, crop, crop, RGB):"
            " the decoder's frame count or crop size does not match the model"
        )

    @torch.inference_mode()
    def _encode(self, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 ``(B, T, H, W, 3)`` -> normalized embeddings float32 ``(B, P)``, re-rank features float16
        (or ``None``)."""
        rows = len(videos)
        if self.compiled and rows < self.batch_size:  # the compiled graph's one shape; the padding is dropped
            videos = np.concatenate([videos, np.zeros((self.batch_size - rows, *videos.shape[1:]), np.uint8)])
        frames = torch.from_numpy(videos).to(self.device)  # uint8 crosses to the GPU: a quarter of float32
        pixels = self.preprocessor.normalize(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])
        embedding, rerank = self.encode_videos(pixels.to(self.dtype))
        embedding = F.normalize(embedding[:rows].float(), dim=-1).cpu().numpy()
        return embedding, None if rerank is None else rerank[:rows].to(torch.float16).cpu().numpy()


def compiled_encoder(
    encode: Callable[[torch.Tensor], T], device: torch.device
) -> Callable[[torch.Tensor], T]:
    """``encode`` (a model's video side) through ``torch.compile`` for one input shape (``dynamic=False``:
    the caller pads to it), with CUDA graphs on a GPU (``mode="reduce-overhead"``: one launch per batch;
    the outputs live in the graph's buffers until the next call, so they are copied off at once, as the stage
    does).

    Compiling happens at the first call: on this project's 2-core CPU ~40 s for base-patch32 and ~20 s for
    the bundled model when Inductor's cache (``TORCHINDUCTOR_CACHE_DIR``, by default under the system's temp
    directory) is cold, ~5 s when it is warm; the compiled encoder is 1.14-1.33x as fast as the eager one
    there (``bench/encoder.py --compile``)."""
    return torch.compile(encode, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else None)


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The video encoder's dtype for ``--precision`` (:data:`~pipeline.flags.PRECISIONS`) on ``device``.

    ``auto``: float32 on CPU (the reference's embeddings, to its rounding); on CUDA bfloat16 where the GPU
    supports it natively, else float16. ``fp32``: float32 anywhere. ``bf16``: bfloat16 anywhere, which CPUs
    with AVX512-BF16 or AMX (e.g. AMD Zen 4, Intel Sapphire Rapids) run at ~2.2x float32's rate
    (``bench/precision.py``); CPUs without them (:mod:`pipeline.bf16`) at 0.16-0.33x."""
    check_choice("--precision", precision, PRECISIONS)
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return torch.float32
    if precision == "bf16" or torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float16
