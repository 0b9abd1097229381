"""Synthetic captioned videos: coloured shapes moving over a background, written as real H.264 files.

Each clip is a :class:`Scene` (shape x colour x motion x size x background) whose caption says what is on
screen, e.g. "a small red circle moving left on a black background". The demo embeds such clips and
queries them by their captions; training can use the same generator with held-out combinations.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass

import av
import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40)}
MOTIONS = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "growing",
    "shrinking",
    "standing still",
)
SIZES = {"small": 0.12, "large": 0.25}  # radius as a fraction of the frame's shorter side
BACKGROUNDS = {"black": (10, 10, 10), "white": (240, 240, 240)}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    motion: str
    size: str = "small"
    background: str = "black"

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {self.motion} on a {self.background} background"


def all_scenes() -> list[Scene]:
    return [Scene(*combo) for combo in itertools.product(SHAPES, COLOURS, MOTIONS, SIZES, BACKGROUNDS)]


def sample_scenes(count: int, seed: int = 0) -> list[Scene]:
    """``count`` distinct scenes, drawn reproducibly."""
    scenes = all_scenes()
    if count > len(scenes):
        raise ValueError(f"only {len(scenes)} distinct scenes exist, asked for {count}")
    return random.Random(seed).sample(scenes, count)


def render(scene: Scene, num_frames: int, width: int, height: int) -> np.ndarray:
    """uint8 (num_frames, height, width, 3) RGB frames of the scene."""
    y, x = np.mgrid[:height, :width].astype(np.float32)
    side = min(width, height)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        progress = t / max(num_frames - 1, 1)  # 0 -> 1 over the clip
        cx, cy, radius = width / 2, height / 2, SIZES[scene.size] * side
        travel = 0.6 * (progress - 0.5)
        if scene.motion == "moving left":
            cx -= travel * width
        elif scene.motion == "moving right":
            cx += travel * width
        elif scene.motion == "moving up":
            cy -= travel * height
        elif scene.motion == "moving down":
            cy += travel * height
        elif scene.motion == "growing":
            radius *= 0.5 + progress
        elif scene.motion == "shrinking":
            radius *= 1.5 - progress
        dx, dy = x - cx, y - cy
        if scene.shape == "circle":
            inside = dx**2 + dy**2 <= radius**2
        elif scene.shape == "square":
            inside = (abs(dx) <= radius) & (abs(dy) <= radius)
        else:  # an upward triangle inscribed in the radius
            inside = (dy <= radius * 0.7) & (dy >= -radius) & (abs(dx) <= (dy + radius) * 0.6)
        frame = np.empty((height, width, 3), dtype=np.uint8)
        frame[:] = BACKGROUNDS[scene.background]
        frame[inside] = COLOURS[scene.colour]
        frames[t] = frame
    return frames


def write_clip(
    path: str | os.PathLike,
    scene: Scene,
    seconds: float = 2.0,
    fps: int = 12,
    width: int = 160,
    height: int = 120,
) -> str:
    """Encode the scene as an H.264 MP4 file; returns the path."""
    path = os.fspath(path)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in render(scene, max(1, round(seconds * fps)), width, height):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
