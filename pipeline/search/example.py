"""A video from outside a library, embedded as the library's videos were: the query of "videos like this one".

The video is decoded by the embed job's decode stage with the library's decoding (its frames per clip and
its sampling) and encoded by the library's model, whole, as one clip: trim a long video to the moment to
look for. Its embedding is compared with the stored ones by cosine (an embedding, not a text, is the query).
"""

from __future__ import annotations

from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..embed.stages.decode import DecodeSettings, decode_video, error_reason
from ..models import VideoTextModel
from ..storage import StorageOptions, Store


class BadExample(ValueError):
    """The example video cannot be read or decoded."""


@torch.inference_mode()
def example_embedding(
    model: VideoTextModel,
    decode: dict[str, Any] | None,
    video: str | IO[bytes],
    options: StorageOptions | None = None,
) -> np.ndarray:
    """The L2-normalized float32 embedding (1, P) of ``video`` (a URI read with ``options``, or a seekable
    binary file: an upload), decoded as a library's manifest ``decode`` records (``None``: the model's frames,
    exact sampling). Raises :class:`BadExample` naming the reason when it cannot be read or decoded."""
    decode = decode or {}
    frames = decode.get("frames") or model.num_frames
    settings = DecodeSettings(frames, model.preprocessor, sampling=decode.get("sampling", "exact"))
    uri = video if isinstance(video, str) else ""
    try:
        (row,) = decode_video(Store(uri, options) if uri else video, settings)
    except Exception as err:  # noqa: BLE001 - every reason a video fails is the user's to read
        reason = error_reason(err, uri, options)
        raise BadExample(f"{uri or 'the video'} cannot be used as an example: {reason}") from err
    pixels = model.preprocessor.normalize(row["frames"]).unsqueeze(0)
    dtype = next(iter(model.parameters())).dtype
    embedding, _ = model.encode_videos(pixels.to(dtype))
    return F.normalize(embedding.float(), dim=-1).numpy()
