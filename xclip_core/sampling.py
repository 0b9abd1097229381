"""Which frames of a video X-CLIP looks at, and how a long video is cut into segments.

Pure arithmetic (no decoding), so a planner can decide what to decode before opening the file.
"""

from __future__ import annotations

import math


def segment_frame_indices(
    num_video_frames: int, num_frames: int, start: int = 0, end: int | None = None
) -> list[int]:
    """Indices of ``num_frames`` frames spread uniformly over the frame range ``[start, end)``.

    This is X-CLIP's test-time sampling (``SampleFrames(clip_len=1, frame_interval=1,
    num_clips=num_frames, test_mode=True)`` in ``X-CLIP/datasets/pipeline.py``, one view): the range of
    ``n = end - start`` frames is cut into ``num_frames`` equal segments and the middle frame of each is
    taken::

        avg = n / num_frames
        index_i = start + int(i * avg + avg / 2.0) % n        for i in 0 .. num_frames - 1

    evaluated in double precision in that order, with ``int`` truncating like the original's ``astype(int)``.
    When the range holds fewer than ``num_frames`` frames, indices repeat (e.g. 3 frames, 8 wanted ->
    ``[0, 0, 0, 1, 1, 2, 2, 2]``), as in the original. ``end`` defaults to, and is clipped to,
    ``num_video_frames``, so a segment computed from timestamps may overshoot the decoded frame count.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    end = num_video_frames if end is None else min(end, num_video_frames)
    n = end - start
    if start < 0 or n < 1:
        raise ValueError(f"empty frame range [{start}, {end}) in a video of {num_video_frames} frames")
    avg = n / float(num_frames)
    return [start + int(i * avg + avg / 2.0) % n for i in range(num_frames)]


def segments(duration_s: float, segment_s: float) -> list[tuple[float, float]]:
    """Consecutive ``(start_s, end_s)`` windows of ``segment_s`` seconds covering ``[0, duration_s]``.

    The last window ends exactly at ``duration_s`` and may be shorter; none is empty (a float rounding
    remainder below 1e-9 of a window is absorbed by the last window instead of opening a new one).
    """
    if duration_s <= 0 or segment_s <= 0:
        raise ValueError(f"duration_s and segment_s must be > 0, got {duration_s} and {segment_s}")
    count = max(1, math.ceil(duration_s / segment_s - 1e-9))
    return [(i * segment_s, duration_s if i == count - 1 else (i + 1) * segment_s) for i in range(count)]
