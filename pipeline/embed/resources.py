"""How the embed job shares a cluster between its stages (no Ray here: the job passes the cluster's size).

With GPUs, one encoder per GPU share and every CPU left decodes. On a CPU-only cluster, which stage is the
bottleneck depends on the model and the videos: base-patch32 encodes a video in seconds and decodes it in a
tenth of one, the bundled tiny model encodes in a fiftieth and is decode-bound. So the
driver times one video of each stage (the first listed videos, decoded as the job will; the loaded model on
a zero clip, one thread) and shares the CPUs in proportion, before any actor starts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..models import VideoTextModel
from ..storage import StorageOptions, Store
from .options import EmbedOptions
from .stages.decode import DecodeSettings, decode_video

log = logging.getLogger(__name__)

WRITE_CPUS = 0.1  # the write stage's tasks
GPU_ENCODER_CPUS = 1.0  # a GPU encoder's CPU: batches in, results out (the frames are normalized on the GPU)

FALLBACK_DECODE_S = 0.1  # per video, when none of the first videos decodes (a typical 10 s 360p clip)
TIMED_VIDEOS = 3  # listed videos tried for the decode timing


@dataclass(frozen=True)
class CpuShares:
    decoders: int
    cpus_per_decoder: float
    cpus_per_encoder: float
    decode_s: float  # measured seconds per decoded row (video or segment), one thread
    encode_s: float  # measured seconds per encoded row, one thread


def time_decode(listed: list[dict[str, Any]], settings: DecodeSettings, storage: StorageOptions) -> float:
    """Seconds to decode the first listed video that decodes (of :data:`TIMED_VIDEOS`), as a whole. A
    segment costs about as much as a whole video: the same frames, sought."""
    whole = replace(settings, segment_s=None)
    for row in [row for row in listed if row["size"]][:TIMED_VIDEOS]:
        started = time.perf_counter()
        try:
            decode_video(Store(row["uri"], storage), whole)
        except Exception:  # noqa: BLE001 - a bad video is the job's business, not the timing's
            continue
        return time.perf_counter() - started
    return FALLBACK_DECODE_S


@torch.inference_mode()
def time_encode(model: VideoTextModel) -> float:
    """Seconds for one clip through the model's video side, on one CPU thread."""
    height, width = model.preprocessor.crop_size
    clip = torch.zeros(1, model.num_frames, 3, height, width)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        model.encode_videos(clip)
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)


def time_stages(
    listed: list[dict[str, Any]], settings: DecodeSettings, storage: StorageOptions, model: VideoTextModel
) -> tuple[float, float]:
    """One video's seconds to decode (:func:`time_decode`) and to encode (:func:`time_encode`)."""
    return time_decode(listed, settings, storage), time_encode(model)


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


@dataclass(frozen=True)
class StageResources:
    """The actors of the decode and encode stages and what each one is given."""

    decoders: int
    cpus_per_decoder: float
    encoders: int
    gpus_per_encoder: float
    cpus_per_encoder: float

    @property
    def encoder_device(self) -> str:
        return "cuda" if self.gpus_per_encoder else "cpu"


def stage_resources(
    cpus: float,
    gpus: float,
    objects: int,
    options: EmbedOptions,
    timings: Callable[[], tuple[float, float]],
) -> StageResources:
    """Share a cluster of ``cpus`` and ``gpus`` between the stages, for ``objects`` listed objects.

    With GPUs (unless ``options.gpus_per_encoder`` is 0), one encoder per ``gpus_per_encoder`` GPUs, and every
    CPU that the encoders and the writer leave decodes. With CPUs only, ``timings()`` (one video's seconds
    to decode and to encode, one thread) shares the CPUs in proportion (:func:`share_cpus`). What
    ``options`` sets is kept; there are never more decoders than objects (each is decoded by one actor).
    """
    gpus_per_encoder = options.gpus_per_encoder if options.gpus_per_encoder is not None else float(gpus > 0)
    encoders = options.encoders or (max(1, int(gpus // gpus_per_encoder)) if gpus_per_encoder else 1)
    if gpus_per_encoder:  # GPUs encode fast: every CPU the encoders and the writer leave decodes
        decoders = options.decoders or max(1, int(cpus - encoders * GPU_ENCODER_CPUS - WRITE_CPUS))
        decode_cpus, encode_cpus = 1.0, GPU_ENCODER_CPUS
    else:  # CPUs only: shared between the stages in proportion to one video's measured cost in each
        decode_s, encode_s = timings()
        shares = share_cpus(cpus, decode_s, encode_s, encoders, options.decoders, reserved=WRITE_CPUS)
        decoders, decode_cpus, encode_cpus = shares.decoders, shares.cpus_per_decoder, shares.cpus_per_encoder
        log.info("one video: decode %.3f s, encode %.3f s (one thread)", decode_s, encode_s)
    return StageResources(min(decoders, objects), decode_cpus, encoders, gpus_per_encoder, encode_cpus)
