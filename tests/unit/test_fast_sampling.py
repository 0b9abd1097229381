"""Fast sampling: each of a video's ``num_frames`` frames is some frame within half a sampling interval of the
time exact sampling wants (a keyframe wherever one is that close), its time error recorded on the row."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from helpers import decode_frames, pattern_frames, write_frames

from pipeline.embed.job import embed, refresh
from pipeline.embed.options import EmbedOptions
from pipeline.embed.stages.decode import DecodeSettings, DecodeVideos, decode_video
from pipeline.library import Library
from xclip_core.sampling import segment_frame_indices
from xclip_core.video_transforms import VideoPreprocessor

FPS, FRAMES = 10, 8
PRE = VideoPreprocessor(size=32, crop_size=32)
EXACT = DecodeSettings(FRAMES, PRE)
FAST = DecodeSettings(FRAMES, PRE, sampling="fast")


def keyframes(path: str) -> set[int]:
    """The indices of the video's keyframes, read from its packets (independently of the decoder)."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        return {
            round(float((packet.pts - (stream.start_time or 0)) * stream.time_base) * FPS)
            for packet in container.demux(stream)
            if packet.is_keyframe and packet.pts is not None
        }


def shown_index(path: str, frame: np.ndarray, window: range) -> int | None:
    """The index within ``window`` of the frame that ``frame`` is: the nearest once resized as exact sampling
    does, by far (fast sampling resizes with FFmpeg's scaler: a few levels from Pillow's resize on this
    grainy pattern, while neighbouring frames differ by 5 to 50); ``None`` where no frame is clearly it."""
    every = PRE.resize_crop(decode_frames(path, list(window))).astype(float)
    distance = np.abs(every - frame).mean(axis=(1, 2, 3))
    nearest, second = np.sort(distance)[:2]
    return window[int(distance.argmin())] if nearest < 5 and 2 * nearest < second else None


@pytest.mark.parametrize(("name", "gop"), [("short-gop.mp4", 5), ("long-gop.mp4", 60), ("short-gop.mkv", 5)])
def test_fast_frames_lie_within_half_an_interval_and_are_keyframes_where_one_is_that_close(
    tmp_path: Path, name: str, gop: int
) -> None:
    count = 120
    path = write_frames(tmp_path / name, pattern_frames(count, 64, 48, "shapes", 3), FPS, gop=gop)
    (row,) = decode_video(path, FAST)
    tolerance = count / FPS / FRAMES / 2  # half the sampling interval: 0.75 s
    assert 0 <= row["sample_error_s"] <= tolerance + 1e-9
    keys = keyframes(path)
    for frame, target in zip(row["frames"], segment_frame_indices(count, FRAMES), strict=True):
        reach = math.floor(tolerance * FPS + 1e-9)  # frames within tolerance of the target
        window = range(max(0, target - reach), min(count, target + reach + 1))
        shown = shown_index(path, frame, window)
        assert shown is not None, f"the frame for {target} is no frame within {tolerance} s of it"
        if keys & set(window):
            assert shown in keys, f"a keyframe lies within reach of {target}, but frame {shown} was taken"
    (exact,) = decode_video(path, EXACT)
    assert exact["sample_error_s"] <= 0.5 / FPS + 1e-9  # exact: the frame shown at the wanted time


def test_fast_sampling_keeps_segments_error_rows_and_frame_counts(tmp_path: Path) -> None:
    path = write_frames(tmp_path / "v.mp4", pattern_frames(150, 64, 48, "shapes", 5), FPS, gop=7)
    rows = decode_video(path, DecodeSettings(FRAMES, PRE, segment_s=4.0, sampling="fast"))
    assert [(r["start_s"], r["end_s"]) for r in rows] == [(0.0, 4.0), (4.0, 8.0), (8.0, 12.0), (12.0, 15.0)]
    for row in rows:
        assert row["frames"].shape == (FRAMES, 32, 32, 3)
        interval = (row["end_s"] - row["start_s"]) / FRAMES
        assert row["sample_error_s"] <= interval / 2 + 1e-9
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    batch = {
        "uri": np.array([path, str(tmp_path / "broken.mp4")], dtype=object),
        "size": np.array([1, 1]),
        "etag": np.array([None, None], dtype=object),
        "mtime": np.array([0.0, 0.0]),
    }
    out = DecodeVideos(DecodeSettings(FRAMES, PRE, sampling="fast")).decode(batch)
    assert out["error"][0] is None and out["error"][1]
    assert math.isnan(out["sample_error_s"][1]) and out["frames"].shape == (2, FRAMES, 32, 32, 3)
    with pytest.raises(ValueError, match="--sampling must be one of exact, fast"):
        DecodeSettings(FRAMES, PRE, sampling="keyframes")


def test_a_library_records_fast_sampling_and_its_errors_and_a_refresh_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        write_frames(videos / f"{i}.mp4", pattern_frames(60, 64, 48, "shapes", i), FPS, gop=10)
    library = str(tmp_path / "library")
    summary = embed(str(videos), library, EmbedOptions(sampling="fast"))
    assert (summary.ok, summary.executor) == (3, "in-process")
    current = Library.open(library)
    assert current.manifest["decode"]["sampling"] == "fast"
    errors = current.table(["sample_error_s"])["sample_error_s"].to_pylist()
    model_frames = current.manifest["decode"]["frames"]
    assert len(errors) == 3 and all(0 <= e <= 6.0 / model_frames / 2 + 1e-9 for e in errors)
    with pytest.raises(ValueError, match="cannot refresh: version 1 records decoding"):
        refresh(str(videos), library, EmbedOptions())  # exact sampling: not the library's
    assert not refresh(str(videos), library, EmbedOptions(sampling="fast")).published  # nothing changed


@pytest.mark.parametrize("rotation", [0, -90, 180])
@pytest.mark.parametrize("size", [16, 48])  # FFmpeg's scaler shrinking and enlarging
def test_fast_frames_are_resized_as_shown_within_a_few_levels_of_exact_ones(
    tmp_path: Path, rotation: int, size: int
) -> None:
    stored = pattern_frames(20, 64, 32, "shapes", 2)  # landscape as stored
    plain = write_frames(
        tmp_path / "plain.mp4", stored, FPS, gop=1
    )  # all keyframes: fast takes exact's frames
    rotated = write_frames(tmp_path / "rotated.mp4", stored, FPS, gop=1, rotation=rotation)
    pre = VideoPreprocessor(
        size=size, crop_size=(size, size * 3 // 4)
    )  # not square: the crop follows the turn
    (fast,) = decode_video(rotated, DecodeSettings(FRAMES, pre, sampling="fast"))
    (exact,) = decode_video(rotated, DecodeSettings(FRAMES, pre))
    assert fast["sample_error_s"] < 1e-9 and exact["sample_error_s"] < 1e-9
    assert fast["frames"].shape == exact["frames"].shape == (FRAMES, size, size * 3 // 4, 3)
    assert np.abs(fast["frames"].astype(float) - exact["frames"]).mean() < 5
    if rotation:  # the same pictures, turned after the resize
        crop = pre.crop_size[::-1] if rotation % 180 else pre.crop_size
        (unturned,) = decode_video(
            plain, DecodeSettings(FRAMES, replace(pre, crop_size=crop), sampling="fast")
        )
        np.testing.assert_array_equal(
            fast["frames"], np.rot90(unturned["frames"], rotation // 90, axes=(1, 2))
        )
