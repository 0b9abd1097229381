"""The train job's backbone cache: a frozen backbone's features, computed once per clip.

EVL trains a decoder over a frozen CLIP backbone, and the train job decodes each clip once, with no random
augmentation: a clip's backbone features are the same at every epoch, and every epoch after the first would
compute again what it already had. With the cache, the decoded clips go through the backbone once, on an
actor pool (:class:`BackboneFeatures`, the training workers' shape), and every epoch steps the decoder from
the stored features: a step costs the decoder's forward and backward alone.

The price is room: K blocks' output, queries and keys per frame, (K, 3, T, L, D) values per clip, kept as
bfloat16 (2 bytes each; ViT-B/16, 8 frames, 4 blocks: 29 MB, against 1.2 MB of decoded frames) in Ray's
object store, which spills to disk beyond its memory. bfloat16 is what the backbone computes in on a GPU;
on a CPU the stored features are the float32 ones rounded to it (relative error 2^-9), so a cached run's
losses differ from an uncached one's in the third digit, not more.

``--backbone-cache``: ``on``, ``off``, or ``auto`` (the default): on for a model with a frozen backbone
(:func:`feature_bytes`) and a run of two epochs or more whose features fill at most half of the object
store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..flags import check_choice
from ..models import VideoTextModel

CACHE_MODES = ("auto", "on", "off")
OBJECT_STORE_SHARE = 0.5  # "auto" caches features that fill at most this share of the object store
COLUMN = "backbone_features"  # what the cache puts in place of a clip's "frames"


def feature_bytes(model: VideoTextModel) -> int | None:
    """Bytes of one clip's cached features, or None for a model without a frozen backbone (X-CLIP)."""
    if not hasattr(model, "backbone_features"):
        return None
    vision, decoder = model.config.vision_config, model.config.decoder_config
    tokens = 1 + vision.num_patches  # the class token and the patches
    return decoder.num_layers * 3 * model.num_frames * tokens * vision.hidden_size * 2


def check_mode(mode: str, per_clip: int | None) -> None:
    """Raises ``ValueError`` for an unknown ``mode``, or ``on`` for a model without a frozen backbone
    (``per_clip``, its :func:`feature_bytes`, is None)."""
    check_choice("--backbone-cache", mode, CACHE_MODES)
    if mode == "on" and per_clip is None:
        raise ValueError(
            "--backbone-cache on: this model trains its whole video encoder (X-CLIP), there is no frozen "
            "backbone to cache"
        )


def use_cache(mode: str, per_clip: int | None, clips: int, epochs: int, object_store_bytes: float) -> bool:
    """Whether a run of ``epochs`` epochs over ``clips`` clips caches the backbone features of a model whose
    :func:`feature_bytes` are ``per_clip`` (the module's rule for ``auto``); raises as :func:`check_mode`
    does."""
    check_mode(mode, per_clip)
    if mode != "auto":
        return mode == "on"
    fits = per_clip is not None and clips * per_clip <= OBJECT_STORE_SHARE * object_store_bytes
    return fits and epochs >= 2


def to_stored(features: torch.Tensor) -> np.ndarray:
    """Features as the cache keeps them: bfloat16, as int16 bits (NumPy has no bfloat16)."""
    return features.to(torch.bfloat16).view(torch.int16).cpu().numpy()


def from_stored(stored: np.ndarray) -> torch.Tensor:
    """:func:`to_stored` undone, as float32."""
    return torch.from_numpy(np.ascontiguousarray(stored)).view(torch.bfloat16).float()


class BackboneFeatures:
    """Ray Data stage: decoded clips -> their backbone features, in the ``backbone_features`` column
    (:func:`to_stored`) in place of ``frames``; other columns pass through."""

    def __init__(self, load: Callable[[], VideoTextModel], device: str = "cpu", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = load().to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        preprocessor = self.model.preprocessor
        pixels = torch.stack([preprocessor.normalize(frames) for frames in batch["frames"]]).to(self.device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            features = self.model.backbone_features(pixels)
        out = {name: values for name, values in batch.items() if name != "frames"}
        out[COLUMN] = to_stored(features)
        return out
