"""Encode stage: decoded rows (uint8 frames) -> X-CLIP video embeddings and prompt features.

One :class:`EncodeFrames` per actor holds the model; Ray Data calls it on numpy batches (dict of columns).
Rows whose ``error`` is not ``None`` pass through with zero embeddings; rows whose frames do not fit the
model become error rows. Nothing in a batch makes the stage raise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.storage import StorageOptions, protocol_of
from xclip_core import XCLIPModel
from xclip_core.video_transforms import VideoPreprocessor


class ModelLoadError(RuntimeError):
    """The model source could not be loaded: missing, unreadable, or not an X-CLIP checkpoint."""


class EncodeFrames:
    """Ray Data callable: drops ``frames``, adds ``embedding``, ``prompt_features`` and ``model_id``.

    ``embedding`` is float32 ``(rows, P)``, L2-normalized; ``prompt_features`` float16 ``(rows, patches, P)``;
    ``model_id`` is :attr:`model_tag` on every row. The model runs on ``device`` ("auto": CUDA if available,
    else CPU), in bfloat16 (float16 where bfloat16 is not supported) on CUDA and float32 on CPU, over
    sub-batches of at most ``batch_size`` videos. ``threads`` sets torch's CPU thread count if given.

    Attributes: ``model_id`` = ``{"source", "weights_sha256"}`` for the library manifest (the hash is of the
    float32 weights as loaded, so CPU and GPU actors agree); ``model_tag`` = ``"<source>@<sha[:16]>"``;
    ``frame_shape`` = the ``(T, crop, crop, 3)`` the model takes; ``embedding_dim`` and ``prompt_shape``.
    """

    def __init__(
        self,
        model_src: str,
        storage_options: StorageOptions | None = None,
        device: str = "auto",
        batch_size: int = 8,
        threads: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if threads:
            torch.set_num_threads(threads)
        storage_options = storage_options or StorageOptions.from_env_and_flags()
        options = storage_options.for_protocol(protocol_of(model_src))
        try:
            model = XCLIPModel.from_pretrained(model_src, storage_options=options)
            self.preprocessor = checkpoint_preprocessor(model_src, options)
        except Exception as e:
            raise ModelLoadError(f"cannot load the X-CLIP model from {model_src!r}: {e}") from e
        sha = model.weights_sha256()
        self.model_id = {"source": model_src, "weights_sha256": sha}
        self.model_tag = f"{model_src}@{sha[:16]}"

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = _compute_dtype(self.device)
        self.model = model.to(self.device, self.dtype)
        self.batch_size = batch_size

        vision = model.config.vision_config
        self.frame_shape = (vision.num_frames, vision.image_size, vision.image_size, 3)
        self.embedding_dim = model.config.projection_dim
        self.prompt_shape = (vision.num_patches, model.config.projection_dim)

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
        prompt_features = np.zeros((rows, *self.prompt_shape), np.float16)
        for start in range(0, len(good), self.batch_size):
            chunk = good[start : start + self.batch_size]
            embedding[chunk], prompt_features[chunk] = self._encode(np.stack([frames[i] for i in chunk]))
        out = {name: column for name, column in batch.items() if name != "frames"}
        out.update(
            error=errors,
            embedding=embedding,
            prompt_features=prompt_features,
            model_id=np.full(rows, self.model_tag, dtype=object),
        )
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
    def _encode(self, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``(B, T, H, W, 3)`` -> normalized embeddings float32 ``(B, P)``, prompt features float16."""
        frames = torch.from_numpy(videos).to(self.device)  # uint8 crosses to the GPU: a quarter of float32
        pixels = self.preprocessor.normalize(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])
        out = self.model.encode_videos(pixels.to(self.dtype))
        embedding = F.normalize(out.video_embeds.float(), dim=-1)
        return embedding.cpu().numpy(), out.prompt_features.to(torch.float16).cpu().numpy()


def _compute_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU; on CUDA bfloat16 where the GPU supports it natively, else float16."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def checkpoint_preprocessor(model_src: str, storage_options: dict[str, Any]) -> VideoPreprocessor:
    """The checkpoint's preprocessor; the X-CLIP defaults where it has no preprocessor config."""
    try:
        return VideoPreprocessor.from_pretrained(model_src, storage_options)
    except FileNotFoundError:
        return VideoPreprocessor()
