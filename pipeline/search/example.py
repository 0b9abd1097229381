"""A video from outside a library, embedded as the library's videos were: the query of "videos like this one".

The video is decoded by the embed job's decode stage with the library's decoding (its frames per clip and
its sampling) and encoded by the library's model, whole, as one clip: trim a long video to the moment to
look for. Its embedding is compared with the stored ones by cosine (an embedding, not a text, is the query).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..embed.stages.decode import DecodeSettings, decode_video, error_reason
from ..models import VideoTextModel
from ..storage import StorageOptions, Store


class BadExample(ValueError):
    """The example video cannot be read or decoded."""


def example_settings(model: VideoTextModel, decode: dict[str, Any] | None) -> DecodeSettings:
    """How an example is decoded for a library whose manifest records ``decode`` (``None``: the model's
    frames, exact sampling): as one clip, whatever the library's segments."""
    decode = decode or {}
    frames = decode.get("frames") or model.num_frames
    return DecodeSettings(frames, model.preprocessor, sampling=decode.get("sampling", "exact"))


def decode_example(video: str, settings: DecodeSettings, options: StorageOptions | None = None) -> np.ndarray:
    """The model-ready frames (uint8, ``settings.frames_shape``) of the video at ``video`` (a URI read with
    ``options``), decoded in this process. Raises :class:`BadExample` naming the reason it cannot be."""
    try:
        (row,) = decode_video(Store(video, options), settings)
    except Exception as err:  # noqa: BLE001 - every reason a video fails is the user's to read
        reason = error_reason(err, video, options)
        raise BadExample(f"{video} cannot be used as an example: {reason}") from err
    return row["frames"]


@torch.inference_mode()
def example_embedding(model: VideoTextModel, frames: np.ndarray) -> np.ndarray:
    """The L2-normalized float32 embedding (1, P) of one clip's model-ready ``frames``."""
    pixels = model.preprocessor.normalize(frames).unsqueeze(0)
    dtype = next(iter(model.parameters())).dtype
    embedding, _ = model.encode_videos(pixels.to(dtype))
    return F.normalize(embedding.float(), dim=-1).numpy()
