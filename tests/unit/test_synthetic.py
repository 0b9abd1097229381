"""The synthetic captioned videos say what they show: motions, colours and the held-out split."""

from __future__ import annotations

import csv

import av
import numpy as np
import pytest
from helpers import decode_frames

from pipeline.samples.synthetic import (
    COLOURS,
    MOTIONS,
    Scene,
    Shape,
    render,
    sample_scenes,
    split,
    write_clip,
    write_dataset,
)


def colour_mask(frames: np.ndarray, colour: str) -> np.ndarray:
    return np.abs(frames.astype(int) - COLOURS[colour]).sum(-1) < 30


def centroid_and_area(mask: np.ndarray) -> tuple[float, float, int]:
    y, x = np.nonzero(mask)
    return float(x.mean()), float(y.mean()), int(mask.sum())


@pytest.mark.parametrize("motion", MOTIONS)
def test_each_motion_is_what_the_caption_says(motion: str) -> None:
    frames = render(Scene((Shape("square", "red", motion),)), 12, 160, 120)
    (x0, y0, a0), (x1, y1, a1) = (centroid_and_area(colour_mask(f, "red")) for f in (frames[0], frames[-1]))
    moved = {"moving left": x0 - x1, "moving right": x1 - x0, "moving up": y0 - y1, "moving down": y1 - y0}
    if motion in moved:
        assert moved[motion] > 20
    elif motion == "growing":
        assert a1 > 2 * a0
    elif motion == "shrinking":
        assert a0 > 2 * a1
    elif motion == "rotating":  # same place, same size, other pixels
        assert abs(x1 - x0) < 2 and abs(y1 - y0) < 2 and abs(a1 - a0) < 0.1 * a0
        assert (colour_mask(frames[6], "red") != colour_mask(frames[0], "red")).sum() > 0.1 * a0
    else:
        np.testing.assert_array_equal(frames[0], frames[-1])


def test_two_objects_are_both_on_screen_in_their_colours() -> None:
    scene = Scene(
        (Shape("circle", "blue", "standing still"), Shape("triangle", "yellow", "moving up")), "white"
    )
    assert scene.caption == (
        "a small blue circle standing still and a small yellow triangle moving up on a white background"
    )
    frame = render(scene, 4, 160, 120)[0]
    blue_x, _, _ = centroid_and_area(colour_mask(frame, "blue"))
    yellow_x, _, _ = centroid_and_area(colour_mask(frame, "yellow"))
    assert blue_x < 80 < yellow_x
    assert (frame[0, 0] == (240, 240, 240)).all()


def test_sample_scenes_are_distinct_reproducible_and_captioned_unambiguously() -> None:
    scenes = sample_scenes(60, seed=3, max_shapes=2)
    assert len(set(scenes)) == 60 and scenes == sample_scenes(60, seed=3, max_shapes=2)
    assert any(len(s.shapes) == 2 for s in scenes) and any(len(s.shapes) == 1 for s in scenes)
    assert all(len({shape.colour for shape in s.shapes}) == len(s.shapes) for s in scenes)
    assert len({s.caption for s in scenes}) == 60


def test_held_out_combinations_never_appear_in_training() -> None:
    train, test = split(0.2, seed=1)
    held_out = {s.combination for s in test}
    assert held_out and not held_out & {s.combination for s in train}
    assert len(held_out) == round(0.2 * len({s.combination for s in train + test}))
    training_scenes = sample_scenes(100, seed=0, max_shapes=2, shapes=train)
    assert not {s.combination for scene in training_scenes for s in scene.shapes} & held_out


def test_write_dataset_writes_real_videos_and_their_captions(tmp_path) -> None:
    scenes = sample_scenes(3, seed=0)
    table = write_dataset(tmp_path, scenes, seconds=1.0, fps=8)
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["caption"] for r in rows] == [s.caption for s in scenes]
    for row in rows:  # names relative to the table, so that the directory can move as one
        assert decode_frames(tmp_path / row["uri"]).shape == (8, 128, 128, 3)


@pytest.mark.parametrize("gop", [None, 5])
def test_clips_have_a_keyframe_every_gop_frames(tmp_path, gop: int | None) -> None:
    path = write_clip(tmp_path / "clip.mp4", sample_scenes(1, seed=1)[0], seconds=2.0, fps=10, gop=gop)
    with av.open(path) as container:
        keys = [i for i, packet in enumerate(container.demux(video=0)) if packet.is_keyframe]
    assert keys == ([0] if gop is None else list(range(0, 20, gop)))  # x264's default: 250 frames
