"""Decode stage: real videos written with PyAV, frames checked against decord, bad files, S3 ranged reads."""

from __future__ import annotations

import io
import itertools
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from helpers import (
    decode_frames,
    nvdec_available,
    pattern_frames,
    write_audio,
    write_frames,
    write_video,
)
from PIL import Image

from pipeline.embed.stages.decode import (
    MAX_PIXELS,
    SEGMENTS_PER_BATCH,
    DecodeError,
    DecodeSettings,
    DecodeVideos,
    decode_video,
    nvdec_decodes,
    open_video,
)
from pipeline.embed.stages.frame_reader import FrameReader, RGBConverter
from pipeline.embed.stages.list import list_objects
from pipeline.flags import NodeSettingError
from pipeline.storage import Store
from xclip_core.sampling import segment_frame_indices
from xclip_core.video_transforms import VideoPreprocessor

PRE = VideoPreprocessor()
FULL_SIZE = VideoPreprocessor(do_resize=False, do_center_crop=False)  # frames come out as decoded


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Small test videos, written once."""
    d = tmp_path_factory.mktemp("videos")
    shapes = pattern_frames(250, 96, 54, "shapes", 1)
    return {
        "h264_10s": write_frames(d / "h264_10s.mp4", shapes, gop=25),  # keyframe every second
        "h264_default_gop": write_frames(d / "h264_default_gop.mp4", shapes[:100]),  # one keyframe
        "mpeg4": write_frames(d / "mpeg4.mp4", shapes[:100], codec="mpeg4", gop=10),
        "mkv": write_frames(d / "h264.mkv", shapes[:100], gop=10),
        "avi": write_frames(d / "h264.avi", shapes[:100], gop=10),  # no timestamps, B-frames
        "ts": write_frames(d / "h264.ts", shapes[:100], gop=10),  # no index
        "hevc": write_frames(d / "hevc.mp4", shapes[:100], codec="libx265", gop=10),
        "av1": write_frames(d / "av1.mkv", shapes[:100], codec="libsvtav1", gop=10),
        "live_webm": write_frames(d / "live.webm", shapes[:60], codec="libvpx", gop=10, live=True),
        "odd_h264": write_video(d / "odd_h264.mp4", 9, 63, 47, seed=2),
        "odd_mpeg4": write_video(d / "odd_mpeg4.mp4", 9, 63, 47, codec="mpeg4", seed=3),
        "one_frame": write_video(d / "one_frame.mp4", 1, 64, 48, seed=4),
    }


def listed(*paths: str, sizes: list[int] | None = None) -> dict[str, np.ndarray]:
    """A batch of listed rows for local files."""
    return {
        "uri": np.array(paths, dtype=object),
        "size": np.array(sizes if sizes is not None else [os.path.getsize(p) for p in paths], dtype=np.int64),
        "etag": np.array([None] * len(paths), dtype=object),
        "mtime": np.array([1.5] * len(paths)),
    }


def reference(path: str, indices: list[int], preprocessor: VideoPreprocessor = PRE) -> np.ndarray:
    """The frames at ``indices`` decoded independently (decord ``get_batch``), then resized and cropped."""
    return preprocessor.resize_crop(decode_frames(path, indices))


def test_the_video_track_is_read_past_a_picture_track_before_it(tmp_path: Path) -> None:
    """A Matroska file whose first video track is one still picture (a cover, as some tools store it): the
    moving track is sampled, as decord (the reference's reader) picks it, not the picture."""
    frames = pattern_frames(50, 96, 54, "shapes", 5)
    cover = np.full((64, 64, 3), 90, np.uint8)
    path = write_frames(tmp_path / "cover_first.mkv", frames, picture_first=cover)
    with av.open(path) as container:
        assert [s.codec_context.name for s in container.streams.video] == ["mjpeg", "h264"]
    (row,) = decode_video(path, DecodeSettings(8, PRE))
    assert (row["width"], row["height"], row["frame_count"]) == (96, 54, 50)
    np.testing.assert_array_equal(row["frames"], reference(path, segment_frame_indices(50, 8, 0, 50)))


def test_segments_rows_times_and_frames(videos: dict[str, str]) -> None:
    path = videos["h264_10s"]
    out = DecodeVideos(DecodeSettings(8, PRE, segment_s=4)).decode(listed(path))
    assert list(out["segment"]) == [0, 1, 2]
    assert list(zip(out["start_s"], out["end_s"], strict=True)) == [(0, 4), (4, 8), (8, 10)]
    assert list(out["uri"]) == [path] * 3 and list(out["mtime"]) == [1.5] * 3
    assert set(out["duration_s"]) == {10.0} and set(out["fps"]) == {25.0} and set(out["frame_count"]) == {250}
    assert set(out["width"]) == {96} and set(out["height"]) == {54} and list(out["error"]) == [None] * 3
    assert out["frames"].dtype == np.uint8 and out["frames"].shape == (3, 8, 224, 224, 3)
    for frames, (start, end) in zip(out["frames"], [(0, 100), (100, 200), (200, 250)], strict=True):
        np.testing.assert_array_equal(frames, reference(path, segment_frame_indices(250, 8, start, end)))


def every_frame(path: str) -> np.ndarray:
    """All frames, decoded by PyAV from the first to the last (no seeking), as uint8 (N, H, W, 3) RGB."""
    with av.open(path) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.mark.parametrize("name", ["h264_10s", "h264_default_gop", "mpeg4", "mkv", "avi", "ts", "hevc", "av1"])
@pytest.mark.parametrize("max_forward_s", [0.0, 1.0, float("inf")])  # seek whenever useful / default / never
@pytest.mark.parametrize("num_frames", [8, 14])  # 14: some frames just before keyframes
def test_frames_equal_independent_decoding(
    videos: dict[str, str], name: str, max_forward_s: float, num_frames: int
) -> None:
    path = videos[name]
    (row,) = decode_video(path, DecodeSettings(num_frames, PRE, max_forward_s=max_forward_s))
    frames = every_frame(path)
    indices = segment_frame_indices(len(frames), num_frames)
    assert row["frame_count"] == len(frames)
    np.testing.assert_array_equal(row["frames"], PRE.resize_crop(frames[indices]))
    if name == "mpeg4":  # MPEG-4 part 2 has no bit-exact inverse DCT: decord's FFmpeg 4.1 is 1-2 levels off
        diff = np.abs(row["frames"].astype(int) - reference(path, indices))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01
    elif name in ("avi", "hevc"):  # decord seeks to wrong frames in these (B-frames); reading all is right
        np.testing.assert_array_equal(row["frames"], PRE.resize_crop(decode_frames(path)[indices]))
    elif name not in ("ts", "av1"):  # decord returns MPEG-TS frames 2 late; its FFmpeg 4.1 has no AV1 decoder
        np.testing.assert_array_equal(row["frames"], reference(path, indices))


@pytest.mark.parametrize(
    ("name", "codec", "pix_fmt"),
    [
        ("h264_10bit.mp4", "libx264", "yuv420p10le"),  # High 10, as phones record HDR
        ("hevc_10bit.mp4", "libx265", "yuv420p10le"),
        ("h264_444.mp4", "libx264", "yuv444p"),  # full-resolution colour (screen recordings)
        ("prores.mov", "prores", "yuv422p10le"),  # cameras and editors: every frame a keyframe
        ("raw.h264", "libx264", "yuv420p"),  # an elementary stream: no container, no timestamps, no index
        ("animation.gif", "gif", "rgb8"),  # a palette, no codec timestamps of its own
    ],
)
@pytest.mark.parametrize("sampling", ["exact", "fast"])
def test_deep_colour_chroma_layouts_and_bare_streams_give_the_sampled_frames(
    tmp_path: Path, name: str, codec: str, pix_fmt: str, sampling: str
) -> None:
    shapes = pattern_frames(40, 96, 54, "shapes", 5)
    path = write_frames(tmp_path / name, shapes, codec=codec, pix_fmt=pix_fmt, gop=10)
    (row,) = decode_video(path, DecodeSettings(8, PRE, sampling=sampling))
    frames = every_frame(path)
    assert row["frame_count"] == len(frames) == 40 and row["duration_s"] == pytest.approx(40 / 25)
    if sampling == "exact":
        assert row["sample_error_s"] < 1e-9  # the frame shown at each wanted time
        np.testing.assert_array_equal(row["frames"], PRE.resize_crop(frames[segment_frame_indices(40, 8)]))
    else:  # within half the sampling interval of each wanted time, every frame sampled
        assert row["frames"].shape == (8, *PRE.crop_size, 3) and row["sample_error_s"] <= 40 / 25 / 8 / 2


@pytest.mark.parametrize(
    ("name", "skips"), [("h264_10s", True), ("hevc", True), ("avi", False), ("av1", False)]
)
def test_unreferenced_frames_are_skipped_where_the_decoder_allows_it(
    videos: dict[str, str], name: str, skips: bool
) -> None:
    """H.264 and HEVC leave unreferenced frames before a wanted one undecoded (cheaper, the same frames);
    AVI counts its frames, and libdav1d (AV1) would drop every unreferenced frame of the video, picking
    neighbours of the wanted frames (the AV1 case of the test above)."""
    with av.open(videos[name]) as container:
        stream = container.streams.video[0]
        assert FrameReader(container, stream, float(stream.average_rate), 1.0).may_skip is skips


@pytest.mark.parametrize("name", ["odd_h264", "odd_mpeg4", "one_frame"])
def test_odd_sizes_and_one_frame(videos: dict[str, str], name: str) -> None:
    path = videos[name]
    (row,) = decode_video(path, DecodeSettings(8, PRE, segment_s=4))
    frames = every_frame(path)
    count, height, width, _ = frames.shape
    indices = segment_frame_indices(count, 8)
    assert (row["frame_count"], row["width"], row["height"]) == (count, width, height)
    assert (row["start_s"], row["end_s"]) == (0.0, row["duration_s"]) and row["duration_s"] == count / 25
    np.testing.assert_array_equal(row["frames"], PRE.resize_crop(frames[indices]))
    if name != "odd_mpeg4":  # odd-height 4:2:0: decord (FFmpeg 4.1) differs along colour edges (chroma)
        np.testing.assert_array_equal(row["frames"], reference(path, indices))


def test_duration_and_frame_count_missing_from_header(videos: dict[str, str]) -> None:
    """A live-recorded WebM has no duration, frame count or index: they come from its packets."""
    path = videos["live_webm"]
    with av.open(path) as container:
        stream = container.streams.video[0]
        assert container.duration is None and stream.duration is None and stream.frames == 0
        every_frame = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
    (row,) = decode_video(path, DecodeSettings(8, PRE))
    assert (row["frame_count"], row["duration_s"], row["fps"]) == (60, 2.4, 25.0)
    np.testing.assert_array_equal(row["frames"], PRE.resize_crop(every_frame[segment_frame_indices(60, 8)]))


@pytest.mark.parametrize("rotation", [-90, 90, 180])
def test_display_rotation_is_applied(tmp_path: Path, rotation: int) -> None:
    frames = np.full((6, 32, 64, 3), 128, np.uint8)  # landscape as stored
    frames[:, :12, :20] = (255, 0, 0)  # a red block at the stored top left
    plain = write_frames(tmp_path / "plain.mp4", frames)
    rotated = write_frames(tmp_path / "rotated.mp4", frames, rotation=rotation)
    (row,) = decode_video(rotated, DecodeSettings(4, FULL_SIZE))
    (plain_row,) = decode_video(plain, DecodeSettings(4, FULL_SIZE))
    np.testing.assert_array_equal(row["frames"], np.rot90(plain_row["frames"], rotation // 90, axes=(1, 2)))
    np.testing.assert_array_equal(row["frames"], decode_frames(rotated, [0, 1, 3, 4]))  # decord rotates too
    portrait = rotation != 180
    assert (row["width"], row["height"]) == ((32, 64) if portrait else (64, 32))
    assert Image.open(io.BytesIO(row["thumbnail"])).size == ((160, 320) if portrait else (320, 160))
    red = row["frames"][0, :, :, 0].astype(int) - row["frames"][0, :, :, 2]  # red minus blue
    corner = {
        -90: (slice(0, 12), slice(-12, None)),
        90: (slice(-12, None), slice(0, 12)),
        180: (slice(-8, None), slice(-12, None)),
    }[rotation]
    assert red[corner].mean() > 200  # phone "rotate=90" (-90 here): stored top left shows at the top right


def shown_at(times: np.ndarray, wanted: float, period: float) -> int:
    """The frame shown at ``wanted``: the first from half a period before; where it starts more than half a
    period after (a gap), the one on screen, before it."""
    first = int(np.argmax(times >= wanted - period / 2))
    return first - 1 if times[first] > wanted + period / 2 and first > 0 else first


def test_variable_frame_rate_samples_by_time(tmp_path: Path) -> None:
    times = np.round(np.cumsum([0] + [0.02, 0.1] * 20)[:40], 3)  # 20 ms and 100 ms gaps alternating
    path = write_frames(tmp_path / "vfr.mp4", pattern_frames(40, 64, 48, "shapes", 5), times=times)
    (row,) = decode_video(path, DecodeSettings(8, PRE))
    assert times[-1] < row["duration_s"] < times[-1] + 0.1 and row["fps"] == 40 / row["duration_s"]
    indices = segment_frame_indices(40, 8)
    shown = [shown_at(times, i / row["fps"], 1 / row["fps"]) for i in indices]  # index i stands for i / fps
    assert shown != indices  # sampling by time differs from sampling by index here
    np.testing.assert_array_equal(row["frames"], reference(path, shown))


@pytest.mark.parametrize("name", ["still.mp4", "still.mkv", "live.webm", "still.ts"])
def test_a_recording_that_stays_still_is_sampled_as_it_is_seen(tmp_path: Path, name: str) -> None:
    """A screen recording's bursts of frames with 3 s without one between them: each sample is the picture
    on screen at its time, as a viewer sees it. (Taking the next picture instead never sampled the first
    burst, and took the second burst's first picture for times when the first burst's last was shown.)"""
    times = np.round([burst * 3.4 + i * 0.04 for burst in range(5) for i in range(10)], 3)
    codec = {"live.webm": {"codec": "libvpx", "live": True}}.get(name, {})  # as a browser records: no index
    path = write_frames(tmp_path / name, pattern_frames(50, 96, 64, "shapes", 6), times=times, **codec)
    (row,) = decode_video(path, DecodeSettings(8, PRE))
    fps, count = row["fps"], row["frame_count"]
    shown = [shown_at(times, i / fps, 1 / fps) for i in segment_frame_indices(count, 8)]
    assert shown == [9, 9, 19, 19, 29, 29, 39, 39]  # each burst's last picture, on screen until the next
    expected = PRE.resize_crop(every_frame(path))[shown]
    if name != "still.ts":
        np.testing.assert_array_equal(row["frames"], expected)
        assert row["sample_error_s"] < 0.5 / fps  # every picture sampled is on screen at its time
    else:  # no index to decode the first gap's picture again, which the decoder may have skipped: an earlier
        # one of its burst, at its own time; then nothing is skipped, and the later gaps are exact
        np.testing.assert_array_equal(row["frames"][2:], expected[2:])
        first_burst = PRE.resize_crop(every_frame(path)[:10])
        assert all(any(np.array_equal(frame, b) for b in first_burst) for frame in row["frames"][:2])
        assert np.array_equal(row["frames"][:2], expected[:2]) or row["sample_error_s"] > 2  # said so


@pytest.mark.parametrize("sampling", ["exact", "fast"])
def test_recordings_joined_end_to_end_are_sampled_over_their_whole_length(
    tmp_path: Path, sampling: str
) -> None:
    """MPEG-TS files joined with ``cat`` (a recorder's chunks, a camera's clips): the timestamps start over
    where the second begins. Taken at their word, the video lasted as long as its first part and its second
    was never sampled; a player shows both, one after the other, and so does the decoder."""
    parts = [
        Path(write_frames(tmp_path / f"{i}.ts", pattern_frames(20, 64, 48, "shapes", seed), 10, gop=10))
        for i, seed in enumerate((3, 4))
    ]
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(part.read_bytes() for part in parts))
    settings = DecodeSettings(4, PRE, segment_s=1, sampling=sampling)
    rows = decode_video(joined, settings)
    assert [(r["segment"], r["duration_s"], r["frame_count"]) for r in rows] == [
        (i, 4.0, 40) for i in range(4)
    ]
    if sampling == "fast":  # its own picks, within their bound
        assert all(r["sample_error_s"] <= 1 / 4 / 2 for r in rows)
        return
    alone = [row for part in parts for row in decode_video(part, settings)]  # each part decoded by itself
    assert all(r["sample_error_s"] < 1e-9 for r in rows)
    for row, expected in zip(rows, alone, strict=True):  # the same bitstreams: the same pictures
        np.testing.assert_array_equal(row["frames"], expected["frames"])


def test_thumbnails_are_jpegs_of_the_middle_frame(videos: dict[str, str]) -> None:
    path = videos["h264_10s"]
    out = DecodeVideos(DecodeSettings(8, PRE, segment_s=4, thumbnail_size=48)).decode(listed(path))

    def pillow_thumbnail(index: int) -> np.ndarray:
        frame = Image.fromarray(decode_frames(path, [index])[0])
        return np.asarray(frame.resize((85, 48), Image.Resampling.BILINEAR), dtype=float)

    for row, (start, end) in enumerate([(0, 100), (100, 200), (200, 250)]):
        image = Image.open(io.BytesIO(out["thumbnail"][row]))
        assert image.format == "JPEG" and image.size == (85, 48)  # 96x54 scaled by 48/54
        sampled = segment_frame_indices(250, 8, start, end)
        # FFmpeg's scaler and JPEG: within a few levels of Pillow's resize of the middle frame, and nearer it
        # than to the segment's other sampled frames
        distance = {i: np.abs(np.asarray(image, dtype=float) - pillow_thumbnail(i)).mean() for i in sampled}
        assert distance[sampled[4]] < 10 and min(distance, key=distance.get) == sampled[4]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """name -> (path, pattern its error must match)."""
    d = tmp_path_factory.mktemp("bad")
    shapes = pattern_frames(100, 64, 48, "shapes", 6)
    sources = {
        "moov_at_end.mp4": write_frames(d / "src1.mp4", shapes),
        "faststart.mp4": write_frames(d / "src2.mp4", shapes, faststart=True),
        "cut.mkv": write_frames(d / "src3.mkv", shapes),
    }
    for name, source in sources.items():  # cut at half
        data = Path(source).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])
    (d / "empty.mp4").write_bytes(b"")
    (d / "random.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    (d / "notes.txt").write_text("not a video\n" * 200)
    Image.new("RGB", (64, 48), (200, 0, 0)).save(d / "photo.jpg")
    Image.new("RGB", (64, 48), (0, 200, 0)).save(d / "picture.png")
    write_audio(d / "audio.m4a")
    write_audio(d / "album_art.mp4", cover=True)
    write_video(d / "wide.mp4", 2, 2048, 64)
    files = {
        "moov_at_end.mp4": r"truncated or corrupt: moov atom not found",
        "faststart.mp4": r"truncated or corrupt: .+",
        "cut.mkv": r"truncated or corrupt: video data ends at 1\.\d+ s, frame wanted at 3\.\d+ s",
        "empty.mp4": r"empty object",
        "random.mp4": r"not a video: unrecognised format",
        "notes.txt": r"not a video: unrecognised format",
        "photo.jpg": r"not a video: an image \(jpeg\)",
        "picture.png": r"not a video: an image \(png\)",
        "audio.m4a": r"not a video: no video stream",
        "album_art.mp4": r"not a video: no video stream \(only a cover picture\)",
        "wide.mp4": r"resolution 2048x64 exceeds the limit of 100000 pixels",
        "missing.mp4": r".*missing\.mp4: no such object or file",
    }
    return {name: (str(d / name), pattern) for name, pattern in files.items()}


def test_each_bad_file_is_one_error_row(videos: dict[str, str], bad_files: dict[str, tuple[str, str]]):
    good = videos["h264_10s"]
    paths = [good, *(path for path, _ in bad_files.values()), good]
    sizes = [os.path.getsize(p) if os.path.exists(p) else 1 for p in paths]
    decoder = DecodeVideos(DecodeSettings(8, PRE, segment_s=4, max_pixels=100_000))
    out = decoder.decode(listed(*paths, sizes=sizes))
    assert len(out["uri"]) == 3 + len(bad_files) + 3
    good_rows = np.flatnonzero(out["uri"] == good)
    assert list(good_rows) == [0, 1, 2, len(out["uri"]) - 3, len(out["uri"]) - 2, len(out["uri"]) - 1]
    assert all(out["error"][i] is None for i in good_rows)
    np.testing.assert_array_equal(out["frames"][:3], out["frames"][-3:])
    for row, (name, (path, pattern)) in enumerate(bad_files.items(), start=3):
        assert out["uri"][row] == path and out["size"][row] == sizes[row - 2]
        assert out["error"][row] is not None, name
        assert re.fullmatch(pattern, out["error"][row]), (name, out["error"][row])
        assert out["thumbnail"][row] == b"" and not out["frames"][row].any() and out["width"][row] == 0
        assert np.isnan(out["duration_s"][row])
    # a long-lived decoder that meets the same damage again gives the same reasons (FFmpeg logs it again)
    assert list(decoder.decode(listed(*paths, sizes=sizes))["error"]) == list(out["error"])


def test_decode_video_raises_reasons(bad_files: dict[str, tuple[str, str]]) -> None:
    with pytest.raises(DecodeError, match="^empty object$"):
        decode_video(bad_files["empty.mp4"][0], DecodeSettings(8, PRE))
    with open(bad_files["notes.txt"][0], "rb") as f, pytest.raises(DecodeError, match="unrecognised format"):
        decode_video(io.BytesIO(f.read()), DecodeSettings(8, PRE))  # no file name: probed by content only


class Ledger:
    """A crash ledger as the plan keeps it (there on a Ray actor): unfinished attempts per video."""

    def __init__(self, unfinished: dict[str, int]):
        self.unfinished = dict(unfinished)

    def begin(self, uri: str) -> int:
        self.unfinished[uri] = self.unfinished.get(uri, 0) + 1
        return self.unfinished[uri] - 1

    def end(self, uri: str) -> None:
        self.unfinished.pop(uri, None)


def test_a_video_that_crashed_the_decoder_too_often_becomes_an_error_row(videos: dict[str, str]) -> None:
    crashing, fine = videos["h264_default_gop"], videos["one_frame"]
    # the crashing video was begun 3 times by actors that died before ending it; the other once, and ended
    ledger = Ledger({crashing: 3})
    out = DecodeVideos(DecodeSettings(8, PRE), crash_ledger=ledger, max_tries=3).decode(
        listed(crashing, fine)
    )
    assert out["error"][0] == "the decoder crashed on this video 3 times; not retried"
    assert not out["frames"][0].any()
    assert out["error"][1] is None and out["frames"][1].any()
    assert ledger.unfinished == {}  # both attempts ended: a later retry starts afresh
    # below the limit the video is decoded again
    decoder = DecodeVideos(DecodeSettings(8, PRE), crash_ledger=Ledger({crashing: 2}), max_tries=3)
    again = decoder.decode(listed(crashing))
    assert again["error"][0] is None


def test_empty_batch() -> None:
    out = DecodeVideos(DecodeSettings(8, PRE)).decode(listed())
    assert out["frames"].shape == (0, 8, 224, 224, 3) and out["error"].shape == (0,)


def test_s3_video_decodes_like_the_local_copy(s3, bucket: str, videos: dict[str, str]) -> None:
    path = videos["h264_10s"]
    Store(f"s3://{bucket}/clips/a.mp4", s3.options).write_bytes("", Path(path).read_bytes())
    rows = list_objects(f"s3://{bucket}/clips/", s3.options)
    batch = {name: np.array([row[name] for row in rows], dtype=object) for name in rows[0]}
    remote = DecodeVideos(DecodeSettings(8, PRE, segment_s=4), storage_options=s3.options).decode(batch)
    local = DecodeVideos(DecodeSettings(8, PRE, segment_s=4)).decode(listed(path))
    assert list(remote["uri"]) == [f"s3://{bucket}/clips/a.mp4"] * 3 and remote["etag"][0] == rows[0]["etag"]
    for name in (
        "segment",
        "start_s",
        "end_s",
        "duration_s",
        "fps",
        "frame_count",
        "width",
        "height",
        "frames",
        "thumbnail",
        "error",
    ):
        assert np.array_equal(remote[name], local[name]), name


def test_s3_reads_only_the_ranges_it_needs(s3, bucket: str, tmp_path: Path) -> None:
    """4 frames of a 20 s video: the index and 4 short stretches are fetched, not the whole object."""
    path = write_frames(tmp_path / "long.mp4", pattern_frames(500, 128, 72, "noise", 7), gop=25)
    size = os.path.getsize(path)
    uri = f"s3://{bucket}/long.mp4"
    Store(uri, s3.options).write_bytes("", Path(path).read_bytes())
    # the object is 2.2 MB (about 110 kB a second); blocks scaled down from the 1 MiB default accordingly
    with open_video(Store(uri, s3.options), block_size=64 << 10) as f:
        (row,) = decode_video(f, DecodeSettings(4, PRE))
        fetched = f.cache.total_requested_bytes  # bytes requested from the server
    assert fetched < size / 2, (fetched, size)
    np.testing.assert_array_equal(row["frames"], reference(path, segment_frame_indices(500, 4)))


def test_a_long_video_is_handed_on_in_batches_of_segments(videos: dict[str, str], tmp_path: Path) -> None:
    small = VideoPreprocessor(size=32, crop_size=32)
    decoder = DecodeVideos(DecodeSettings(4, small, segment_s=0.25))  # 10 s: 40 segments
    chunks = list(decoder(listed(videos["h264_10s"])))
    assert [len(chunk["uri"]) for chunk in chunks] == [SEGMENTS_PER_BATCH] * 2 + [40 - 2 * SEGMENTS_PER_BATCH]
    assert [s for chunk in chunks for s in chunk["segment"]] == list(range(40))
    whole = decode_video(videos["h264_10s"], DecodeSettings(4, small, segment_s=0.25))
    np.testing.assert_array_equal(np.concatenate([c["frames"] for c in chunks]), [r["frames"] for r in whole])

    # data that ends in the middle (the index says 10 s): the segments decoded, then the video's error row
    data = Path(write_frames(tmp_path / "fs.mp4", pattern_frames(250, 96, 54, "shapes", 1), faststart=True))
    (tmp_path / "cut.mp4").write_bytes(data.read_bytes()[: data.stat().st_size * 6 // 10])
    cut = decoder.decode(listed(str(tmp_path / "cut.mp4")))
    assert len(cut["error"]) > 1
    assert all(e is None for e in cut["error"][:-1]) and "truncated or corrupt" in cut["error"][-1]


NVDEC = nvdec_available()


@pytest.mark.skipif(NVDEC, reason="this machine can decode on a GPU")
def test_decoding_on_cuda_where_ffmpeg_finds_no_gpu_is_refused_before_any_video() -> None:
    with pytest.raises(ValueError, match="--decode-device cuda: FFmpeg cannot open a CUDA device here"):
        DecodeVideos(DecodeSettings(8, PRE, device="cuda"))
    with pytest.raises(ValueError, match="--decode-device must be one of cpu, cuda, got 'gpu'"):
        DecodeSettings(8, PRE, device="gpu")


@pytest.mark.skipif(NVDEC, reason="this machine can decode on a GPU")
def test_a_gpu_lost_mid_job_stops_the_decoder_instead_of_failing_each_video(
    videos: dict[str, str], tmp_path: Path
) -> None:
    """A decoder that opened its CUDA device (here: one built for the CPU, switched to CUDA) and then cannot
    open it for a video raises the node's error: good videos are not recorded as corrupt."""
    decoder = DecodeVideos(DecodeSettings(8, PRE))
    decoder.settings = replace(decoder.settings, device="cuda")
    with pytest.raises(NodeSettingError, match="--decode-device cuda: FFmpeg cannot open a CUDA device here"):
        decoder.decode(listed(videos["h264_10s"]))
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert decoder.decode(listed(str(tmp_path / "empty.mp4")))["error"].tolist() == ["empty object"]


@pytest.mark.parametrize("shorter_side", [None, 32])  # exact sampling's conversion, and fast sampling's
def test_pictures_in_nvdecs_layout_give_the_software_decoders_rgb(
    videos: dict[str, str], shorter_side: int | None
) -> None:
    """NVDEC hands its pictures back as NV12, FFmpeg's H.264 decoder as planar YUV 4:2:0: the same samples,
    which FFmpeg's scaler turns into other RGB values at full size unless they are repacked first."""
    with av.open(videos["h264_10s"]) as container:
        pictures = list(itertools.islice(container.decode(video=0), 0, 30, 6))
    convert = RGBConverter(MAX_PIXELS, shorter_side)
    for picture in pictures:
        assert picture.format.name == "yuv420p"
        np.testing.assert_array_equal(convert(picture.reformat(format="nv12")), convert(picture))


SCALER_CPU = """
import sys, time
import av, numpy as np
from pipeline.embed.stages.decode import MAX_PIXELS
from pipeline.embed.stages.frame_reader import FrameReader, RGBConverter
rgb = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
picture = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
convert = RGBConverter(MAX_PIXELS, None if sys.argv[1] == "None" else int(sys.argv[1]))
convert(picture)
process, thread = time.process_time(), time.thread_time()
for _ in range(40):
    convert(picture)
print(time.process_time() - process, time.thread_time() - thread)
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="FFmpeg's default is one scaler thread per core")
@pytest.mark.parametrize("shorter_side", [None, 96])
def test_the_scaler_converts_on_the_decoders_own_thread(shorter_side: int | None) -> None:
    """A decoder is one CPU's share: FFmpeg's scaler, left to its default, converted every picture on a thread
    per core (half of the CPU on another thread here, on 2 cores). Measured in a fresh interpreter: the
    threads that earlier tests leave in this process (Ray's, s3fs's loops) would count in its CPU clock."""
    done = subprocess.run(
        [sys.executable, "-c", SCALER_CPU, str(shorter_side)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
        check=True,
    )
    process, thread = map(float, done.stdout.split())
    assert process - thread < 0.1 * process, (process, thread)


@pytest.mark.skipif(not NVDEC, reason="needs NVDEC: an NVIDIA GPU and driver (CI has none)")
@pytest.mark.parametrize("sampling", ["exact", "fast"])
@pytest.mark.parametrize("name", ["h264_10s", "mkv", "ts", "odd_h264", "mpeg4", "live_webm"])
def test_nvdec_gives_the_frames_of_the_cpu_decoder(videos: dict[str, str], name: str, sampling: str) -> None:
    """H.264 decoding is bit-exact by its standard, and the pictures come back to host memory for the same
    conversion and resize; MPEG-4 part 2 (no bit-exact inverse DCT) and VP8 (NVDEC lacks it: FFmpeg's
    software decoder takes over) are held to what the CPU gives within 2 levels."""
    on_gpu = DecodeVideos(DecodeSettings(8, PRE, sampling=sampling, device="cuda")).decode(
        listed(videos[name])
    )
    on_cpu = DecodeVideos(DecodeSettings(8, PRE, sampling=sampling)).decode(listed(videos[name]))
    assert on_gpu["error"].tolist() == [None]
    np.testing.assert_array_equal(on_gpu["sample_error_s"], on_cpu["sample_error_s"])
    if name in ("mpeg4", "live_webm"):
        assert np.abs(on_gpu["frames"].astype(int) - on_cpu["frames"]).max() <= 2
    else:
        np.testing.assert_array_equal(on_gpu["frames"], on_cpu["frames"])
    assert nvdec_decodes(videos["h264_10s"])  # decoded on the GPU, not fallen back to the software decoder
