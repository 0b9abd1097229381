"""How the embed job shares a CPU-only cluster between decoding and encoding.

Which stage is the bottleneck depends on the model and the videos: base-patch32 encodes a video in seconds
and decodes it in a tenth of one, the bundled tiny model encodes in a fiftieth and is decode-bound. So the
driver times one video of each stage (the first listed videos, decoded as the job will; the loaded model on
a zero clip, one thread) and shares the CPUs in proportion, before any actor starts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from xclip_core import XCLIPModel
from xclip_core.video_transforms import VideoPreprocessor

from .stages.decode import decode_video
from .storage import StorageOptions

FALLBACK_DECODE_S = 0.1  # per video, when none of the first videos decodes (a typical 10 s 360p clip)
TIMED_VIDEOS = 3  # listed videos tried for the decode timing


@dataclass(frozen=True)
class CpuShares:
    decoders: int
    cpus_per_decoder: float
    cpus_per_encoder: float
    decode_s: float  # measured seconds per decoded row (video or segment), one thread
    encode_s: float  # measured seconds per encoded row, one thread


def time_decode(
    listed: list[dict[str, Any]], frames: int, preprocessor: VideoPreprocessor, storage: StorageOptions
) -> float:
    """Seconds to sample ``frames`` frames from the first listed video that decodes (of
    :data:`TIMED_VIDEOS`). A segment costs about as much as a whole video: the same frames, sought."""
    for row in [row for row in listed if row["size"]][:TIMED_VIDEOS]:
        started = time.perf_counter()
        try:
            decode_video(row["uri"], frames, preprocessor, storage_options=storage)
        except Exception:  # noqa: BLE001 - a bad video is the job's business, not the timing's
            continue
        return time.perf_counter() - started
    return FALLBACK_DECODE_S


@torch.inference_mode()
def time_encode(model: XCLIPModel) -> float:
    """Seconds for one clip through the model's video side, on one CPU thread."""
    vision = model.config.vision_config
    clip = torch.zeros(1, vision.num_frames, 3, vision.image_size, vision.image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        model.encode_videos(clip)
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)


def time_stages(
    listed: list[dict[str, Any]],
    frames: int,
    preprocessor: VideoPreprocessor,
    storage: StorageOptions,
    model: XCLIPModel,
) -> tuple[float, float]:
    """One video's seconds to decode (:func:`time_decode`) and to encode (:func:`time_encode`)."""
    return time_decode(listed, frames, preprocessor, storage), time_encode(model)


def share_cpus(
    cpus: float,
    decode_s: float,
    encode_s: float,
    encoders: int = 1,
    decoders: int | None = None,
    reserved: float = 0.0,
) -> CpuShares:
    """Split ``cpus`` (less ``reserved``, e.g. the writer's) between the decoders and the encoders in
    proportion to their seconds per row; each encoder keeps at least half a CPU, and ``decoders`` (one core
    each at most: decoding is single-threaded) is derived when not given."""
    free = max(cpus - reserved, 0.5 * encoders + 0.1)
    encode_total = max(0.5 * encoders, free * encode_s / (decode_s + encode_s))
    encode_total = min(encode_total, free - 0.1)  # and the decoders at least a tenth
    decode_total = free - encode_total
    decoders = decoders or max(1, math.ceil(decode_total - 0.25))
    return CpuShares(decoders, decode_total / decoders, encode_total / encoders, decode_s, encode_s)
