"""Synthetic captioned videos: coloured shapes moving over a background, written as real H.264 files.

A clip is a :class:`Scene` of one or two :class:`Shape` objects (kind x colour x motion x size) over a
background; its caption says what is on screen, e.g. "a small red circle moving left and a large blue
square rotating on a black background". The demo embeds such clips and queries them by their captions;
training uses the same generator, with :func:`split` holding out (kind, colour, motion) combinations that
the training set never shows.
"""

from __future__ import annotations

import csv
import itertools
import os
import random
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

KINDS = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40)}
MOTIONS = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "growing",
    "shrinking",
    "rotating",
    "standing still",
)
SIZES = {"small": 0.12, "large": 0.25}  # radius as a fraction of the frame's shorter side
BACKGROUNDS = {"black": (10, 10, 10), "white": (240, 240, 240)}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    motion: str
    size: str = "small"

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.kind} {self.motion}"

    @property
    def combination(self) -> tuple[str, str, str]:
        """What :func:`split` holds out: kind, colour and motion together."""
        return self.kind, self.colour, self.motion


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str = "black"

    @property
    def caption(self) -> str:
        return f"{' and '.join(s.caption for s in self.shapes)} on a {self.background} background"


def all_shapes() -> list[Shape]:
    return [Shape(*combo) for combo in itertools.product(KINDS, COLOURS, MOTIONS, SIZES)]


def sample_scenes(
    count: int, seed: int = 0, max_shapes: int = 1, shapes: list[Shape] | None = None
) -> list[Scene]:
    """``count`` distinct scenes of 1..``max_shapes`` objects drawn (reproducibly) from ``shapes``.

    Two objects in one scene differ in colour, so that the caption tells them apart.
    """
    pool = shapes if shapes is not None else all_shapes()
    rng = random.Random(seed)
    scenes: set[Scene] = set()
    for _ in range(count * 100):
        if len(scenes) == count:
            return sorted(scenes, key=lambda scene: scene.caption)
        first = rng.choice(pool)
        objects = [first]
        if rng.randint(1, max_shapes) == 2:
            others = [s for s in pool if s.colour != first.colour]
            objects.append(rng.choice(others))
        scenes.add(Scene(tuple(objects), rng.choice(list(BACKGROUNDS))))
    raise ValueError(f"could not draw {count} distinct scenes from {len(pool)} shapes")


def split(held_out_fraction: float = 0.2, seed: int = 0) -> tuple[list[Shape], list[Shape]]:
    """Shapes for training and shapes whose (kind, colour, motion) combination training never sees."""
    combinations = sorted({shape.combination for shape in all_shapes()})
    held_out = set(random.Random(seed).sample(combinations, round(len(combinations) * held_out_fraction)))
    train = [s for s in all_shapes() if s.combination not in held_out]
    test = [s for s in all_shapes() if s.combination in held_out]
    return train, test


def _mask(
    shape: Shape, progress: float, x: np.ndarray, y: np.ndarray, centre: tuple[float, float], side: int
):
    """Pixels covered by ``shape`` at ``progress`` (0 -> 1 over the clip) around its starting ``centre``."""
    cx, cy = centre
    radius, angle = SIZES[shape.size] * side, 0.0
    travel = 0.6 * (progress - 0.5) * side
    if shape.motion == "moving left":
        cx -= travel
    elif shape.motion == "moving right":
        cx += travel
    elif shape.motion == "moving up":
        cy -= travel
    elif shape.motion == "moving down":
        cy += travel
    elif shape.motion == "growing":
        radius *= 0.5 + progress
    elif shape.motion == "shrinking":
        radius *= 1.5 - progress
    elif shape.motion == "rotating":
        angle = progress * np.pi  # half a turn over the clip
    # rotate the frame's coordinates into the shape's own
    dx = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    dy = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    if shape.kind == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape.kind == "square":
        return (abs(dx) <= radius) & (abs(dy) <= radius)
    return (dy <= radius * 0.7) & (dy >= -radius) & (abs(dx) <= (dy + radius) * 0.6)  # triangle, apex up


def render(scene: Scene, num_frames: int, width: int, height: int) -> np.ndarray:
    """uint8 (num_frames, height, width, 3) RGB frames of the scene (two objects side by side)."""
    y, x = np.mgrid[:height, :width].astype(np.float32)
    side = min(width, height)
    slots = len(scene.shapes)
    centres = [(width * (i + 0.5) / slots, height / 2) for i in range(slots)]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        progress = t / max(num_frames - 1, 1)
        frame = frames[t]
        frame[:] = BACKGROUNDS[scene.background]
        for shape, centre in zip(scene.shapes, centres, strict=True):
            frame[_mask(shape, progress, x, y, centre, side)] = COLOURS[shape.colour]
    return frames


def write_clip(
    path: str | os.PathLike,
    scene: Scene,
    seconds: float = 2.0,
    fps: int = 12,
    width: int = 128,
    height: int = 128,
    gop: int | None = None,
) -> str:
    """Encode the scene as an H.264 MP4 file; returns the path. ``gop``: frames between keyframes (x264's
    default, 250, otherwise)."""
    path = os.fspath(path)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        for frame in render(scene, max(1, round(seconds * fps)), width, height):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_dataset(directory: str | os.PathLike, scenes: list[Scene], **clip_options) -> str:
    """Write one clip per scene and ``captions.csv`` (``uri,caption``, names relative to the table) beside
    them; returns the CSV's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(scenes):
        name = f"clip-{i:05d}.mp4"
        write_clip(directory / name, scene, **clip_options)
        rows.append((name, scene.caption))
    table = directory / "captions.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "caption"])
        writer.writerows(rows)
    return str(table)
