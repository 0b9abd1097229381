"""Whether an embed job compiles its video encoder (``--compile auto|on|off``).

``torch.compile`` makes the encoder 1.14-1.33x as fast on a CPU (``bench/encoder.py --compile``: Inductor
fuses the layer norms, activations and residual adds around the matrix multiplies), but compiling costs ~40 s
for base-patch32 on a 2-core CPU when Inductor's on-disk cache is cold (~5 s warm), in every encoder actor. So
``auto`` compiles a CPU encoder only when its share of the job is long: at least :data:`COMPILE_FROM_VIDEOS`
videos and :data:`COMPILE_AFTER_S` seconds of encoding by one measured clip, where even a cold compile costs
under half of what it saves (~15% of 10 minutes, against ~40 s). On a GPU the encoder is ~10x faster than the
CPUs decode for it (``bench/RESULTS.md``), so ``auto`` leaves it eager there; ``on`` compiles it with CUDA
graphs (:func:`~pipeline.embed.stages.encode.compiled_encoder`).
"""

from __future__ import annotations

from collections.abc import Callable

COMPILE_FROM_VIDEOS = 100  # fewer videos per encoder are never worth a compile: no encoder is timed
COMPILE_AFTER_S = 600.0  # an encoder's seconds of encoding from which auto compiles it


def compiles(mode: str, on_gpu: bool, videos_per_encoder: float, encode_s: Callable[[], float]) -> bool:
    """Whether the encoders compile, for ``--compile`` ``mode``: ``on``, ``off``, or ``auto`` (a CPU encoder
    with at least :data:`COMPILE_FROM_VIDEOS` videos whose encoding, at ``encode_s()`` seconds per video,
    takes at least :data:`COMPILE_AFTER_S`; ``encode_s`` is called only then)."""
    if mode != "auto":
        return mode == "on"
    if on_gpu or videos_per_encoder < COMPILE_FROM_VIDEOS:
        return False
    return videos_per_encoder * encode_s() >= COMPILE_AFTER_S
