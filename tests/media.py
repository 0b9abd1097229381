"""Real encoded test videos: written with PyAV, read back with decord.

PyAV's wheels here ship ``libx264`` (H.264) and ``mpeg4`` (MPEG-4 part 2) encoders. H.264 in yuv420p needs
even dimensions, so odd-sized H.264 videos are written in yuv444p (which decord decodes as well).
"""

from __future__ import annotations

import os

import av
import decord
import numpy as np

PATTERNS = ("shapes", "noise")


def _frames(num_frames: int, width: int, height: int, pattern: str, seed: int) -> np.ndarray:
    """uint8 (num_frames, height, width, 3) RGB frames, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    if pattern == "noise":
        return rng.integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)
    if pattern != "shapes":
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    y, x = np.mgrid[:height, :width].astype(np.float32)
    texture = rng.integers(-24, 25, (height, width, 1)).astype(np.float32)
    checker = np.where((x // 5 + y // 5) % 2 == 0, 20.0, -20.0)[..., None]
    shapes = [  # (is_disc, colour, size, start, velocity)
        (bool(rng.integers(2)), rng.integers(0, 256, 3), rng.uniform(0.1, 0.3) * min(width, height),
         rng.uniform(0, 1, 2) * (width, height), rng.uniform(-4, 4, 2))
        for _ in range(4)
    ]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        # a diagonal gradient drifting over time, plus a fixed checkerboard and grain
        diagonal = (x + y) / (width + height) * 255 - t
        gradient = np.stack([x / width * 200 + 2 * t, y / height * 160, diagonal], -1)
        frame = gradient + checker + texture
        for is_disc, colour, size, start, velocity in shapes:
            cx, cy = (start + velocity * t) % (width, height)
            if is_disc:
                inside = (x - cx) ** 2 + (y - cy) ** 2 <= size**2
            else:
                inside = (abs(x - cx) <= size) & (abs(y - cy) <= size * 0.6)
            frame[inside] = colour + texture[inside]
        frames[t] = frame.clip(0, 255)
    return frames


def write_video(
    path: str | os.PathLike,
    num_frames: int,
    width: int,
    height: int,
    fps: int = 25,
    codec: str = "libx264",
    pattern: str = "shapes",
    seed: int = 0,
) -> str:
    """Encode a video of moving coloured shapes on a textured background (``pattern="shapes"``) or of
    uniform noise (``"noise"``) with ``codec`` (``"libx264"`` or ``"mpeg4"``); returns the path."""
    path = os.fspath(path)
    odd = width % 2 or height % 2
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv444p" if codec == "libx264" and odd else "yuv420p"
        for frame in _frames(num_frames, width, height, pattern, seed):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def decode_frames(path: str | os.PathLike, indices: list[int] | None = None) -> np.ndarray:
    """Decode all frames (or those at ``indices``) with decord as uint8 (N, H, W, 3) RGB."""
    reader = decord.VideoReader(os.fspath(path))
    return reader.get_batch(list(range(len(reader))) if indices is None else indices).asnumpy()
