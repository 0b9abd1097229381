"""Decode stage: listed objects -> model-ready frames, one row per segment of each video (schema ``DECODED``).

Videos are read with PyAV through the fsspec file object (``av.open(fs.open(path))``). s3fs files are
seekable and fetch byte ranges on demand, so only the container index and the stretches of the stream that
hold the sampled frames are downloaded. decord is not used here: its Python API reads a file object whole
into memory before decoding (and builds its frame index by demuxing every packet), which for an object store
means downloading every video entirely even when 8 frames of it are needed.

Frames are chosen by time: the ``i``-th frame index of X-CLIP's sampling (:func:`segment_frame_indices`)
stands for the time ``i / fps`` (``fps`` the stream's average rate, times relative to the stream start), and
the frame shown then is the first decoded frame whose time is at least that minus half a frame period. For a
constant-frame-rate video this is exactly frame ``i``; for a variable-frame-rate one it samples uniformly in
time. (AVI has no presentation timestamps: its frames are counted.)

Seeking: the decoder runs forward and seeks (to the keyframe at or before the next frame wanted) only where
that skips decoding: in containers with a keyframe index (MP4/MOV, Matroska/WebM), when the next frame wanted
lies more than ``max_forward_s`` ahead and a keyframe lies between it and the current position. Elsewhere
(MPEG-TS, AVI, raw streams) it only decodes forward. Unreferenced frames (most B-frames) before the next
frame wanted are not decoded at all.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import IO, Any

import av
import av.logging
import numpy as np
from av.container import InputContainer
from av.video.stream import VideoStream
from PIL import Image

from pipeline.schema import DECODED, LISTED
from pipeline.storage import StorageOptions, filesystem, is_local, storage_errors, translate_error
from xclip_core.sampling import segment_frame_indices, segments
from xclip_core.video_transforms import VideoPreprocessor

S3_BLOCK_SIZE = 1 << 20  # bytes fetched per ranged read of a remote object
MAX_PIXELS = 8192 * 4320  # frames larger than 8K are refused, not decoded
MAX_FORWARD_S = 1.0  # decode forward rather than seek when the next frame is at most this far ahead
_IO_BUFFER_SIZE = 32 << 10  # bytes PyAV asks the file object for per read
# demuxers whose "video" is a picture; the image ones read by content are all named "<codec>_pipe". (A GIF is
# read as a video: animated GIFs are short clips.)
_NOT_VIDEO = {"ico": "an image"}  # demuxers that probe by content and find no video (images: *_pipe)
_INDEXED_FORMATS = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"}  # FFmpeg demuxers with keyframe indexes
_UNTIMED_FORMATS = {"avi"}  # no presentation timestamps (with B-frames FFmpeg's guesses are out of order)
_INT_COLUMNS = ("segment", "frame_count", "width", "height")
_FLOAT_COLUMNS = ("start_s", "end_s", "duration_s", "fps")


class DecodeError(Exception):
    """A video cannot be decoded; the message is the short reason stored in the row's ``error``."""


def open_video(uri: str, options: StorageOptions | None = None, block_size: int = S3_BLOCK_SIZE) -> IO[bytes]:
    """A seekable binary file object for ``uri``. Remote objects fetch ``block_size`` ranges on demand
    (``readahead`` cache: one block kept, no whole-file caching); storage failures raise ``StorageError``."""
    fs, path = filesystem(uri, options)
    kwargs = {} if is_local(fs) else {"block_size": block_size, "cache_type": "readahead"}
    with storage_errors(uri, "reading", options):
        return fs.open(path, "rb", **kwargs)


def decode_video(
    uri_or_file: str | IO[bytes],
    num_frames: int,
    preprocessor: VideoPreprocessor,
    segment_s: float | None = None,
    *,
    storage_options: StorageOptions | None = None,
    thumbnail_size: int = 160,
    max_pixels: int = MAX_PIXELS,
    max_forward_s: float = MAX_FORWARD_S,
) -> list[dict[str, Any]]:
    """Decode one video into one row per segment (one row when ``segment_s`` is None).

    ``uri_or_file`` is a URI (opened with :func:`open_video`) or a seekable binary file object. Each row has
    the ``DECODED`` columns except the listing's (``uri``, ``size``, ``etag``, ``mtime``), ``error`` None and
    ``frames`` uint8 ``(num_frames, crop_h, crop_w, 3)`` from ``preprocessor.resize_crop``. A video that
    cannot be decoded raises :class:`DecodeError` (or the underlying error; see :func:`error_reason`).
    """
    if isinstance(uri_or_file, str):
        with open_video(uri_or_file, storage_options) as f:
            return decode_video(
                f,
                num_frames,
                preprocessor,
                segment_s,
                thumbnail_size=thumbnail_size,
                max_pixels=max_pixels,
                max_forward_s=max_forward_s,
            )
    if uri_or_file.seek(0, os.SEEK_END) == 0:
        raise DecodeError("empty object")
    uri_or_file.seek(0)
    decode = functools.partial(
        _decode_segments,
        num_frames=num_frames,
        preprocessor=preprocessor,
        segment_s=segment_s,
        thumbnail_size=thumbnail_size,
        max_pixels=max_pixels,
        max_forward_s=max_forward_s,
    )
    with _open_container(uri_or_file) as container:
        stream = _video_stream(container, max_pixels)
        timing = _header_timing(container, stream)
        if timing is not None:
            return decode(container, stream, timing)
        timing = _scan_timing(container, stream)  # the header lacks duration or rate: read every packet
    uri_or_file.seek(0)  # and start over (raw streams cannot seek back)
    with _open_container(uri_or_file) as container:
        return decode(container, _video_stream(container, max_pixels), timing)


def error_reason(exc: BaseException, uri: str = "", options: StorageOptions | None = None) -> str:
    """The short human-readable reason stored in ``error`` for an exception raised by :func:`decode_video`."""
    if isinstance(exc, DecodeError):
        return str(exc)
    if isinstance(exc, av.error.FFmpegError):
        return f"truncated or corrupt: {_ffmpeg_message(exc)}"
    translated = translate_error(exc, uri, "reading", options)
    if translated is not exc:
        return str(translated)
    return f"{type(exc).__name__}: {exc}"


class DecodeVideos:
    """Ray Data ``map_batches`` callable: a batch of listed rows -> a batch of ``DECODED`` rows.

    Constructed once per actor. Every video gives one row per segment, or exactly one error row (zero frames,
    empty thumbnail, NaN times, zero sizes, ``error`` set) when anything about it fails: one bad object never
    fails the batch.

    A crash in native decoder code kills the process, not just the call. ``crash_ledger`` (any object with
    ``begin(uri) -> int``, the number of earlier unfinished attempts, and ``end(uri)``) survives the actor:
    a video that was begun ``max_tries`` times without ending becomes an error row instead of a new crash.
    """

    def __init__(
        self,
        num_frames: int,
        preprocessor: VideoPreprocessor,
        segment_s: float | None = None,
        storage_options: StorageOptions | None = None,
        thumbnail_size: int = 160,
        max_pixels: int = MAX_PIXELS,
        crash_ledger: Any = None,
        max_tries: int = 3,
    ):
        self.crash_ledger = crash_ledger
        self.max_tries = max_tries
        self.num_frames = num_frames
        self.preprocessor = preprocessor
        self.segment_s = segment_s
        self.storage_options = storage_options
        self.thumbnail_size = thumbnail_size
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """Decode every video of ``batch`` (columns ``uri``, ``size``, ``etag``, ``mtime``)."""
        listed = {name: np.asarray(batch[name]) for name in LISTED}
        sources: list[int] = []  # the input row of each output row
        rows: list[dict[str, Any]] = []
        for i, uri in enumerate(listed["uri"]):
            tries = self.crash_ledger.begin(str(uri)) if self.crash_ledger is not None else 0
            try:
                if tries >= self.max_tries:
                    raise DecodeError(f"the decoder crashed on this video {tries} times; not retried")
                if listed["size"][i] == 0:
                    raise DecodeError("empty object")
                decoded = decode_video(
                    str(uri),
                    self.num_frames,
                    self.preprocessor,
                    self.segment_s,
                    storage_options=self.storage_options,
                    thumbnail_size=self.thumbnail_size,
                    max_pixels=self.max_pixels,
                )
            except Exception as e:  # noqa: BLE001 - any failure becomes this video's error row
                decoded = [self._error_row(error_reason(e, str(uri), self.storage_options))]
            if self.crash_ledger is not None:
                self.crash_ledger.end(str(uri))
            rows.extend(decoded)
            sources.extend([i] * len(decoded))
        out: dict[str, np.ndarray] = {name: column[sources] for name, column in listed.items()}
        for name in DECODED[len(LISTED) :]:
            values = [row[name] for row in rows]
            if name == "frames":
                out[name] = np.stack(values) if values else np.zeros((0, *self._frames_shape()), np.uint8)
            elif name in _INT_COLUMNS:
                out[name] = np.array(values, dtype=np.int64)
            elif name in _FLOAT_COLUMNS:
                out[name] = np.array(values, dtype=np.float64)
            else:  # bytes and optional strings: object arrays (numpy's own bytes type would strip b"\0")
                out[name] = np.empty(len(values), dtype=object)
                out[name][:] = values
        return out

    def _frames_shape(self) -> tuple[int, int, int, int]:
        height, width = self.preprocessor.crop_size
        return self.num_frames, height, width, 3

    def _error_row(self, reason: str) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(_INT_COLUMNS, 0) | dict.fromkeys(_FLOAT_COLUMNS, math.nan)
        return row | {"frames": np.zeros(self._frames_shape(), np.uint8), "thumbnail": b"", "error": reason}


def _open_container(file: IO[bytes]) -> InputContainer:
    """``av.open`` with FFmpeg's error messages captured, so a failure can say what was wrong.

    The format is probed by content only: given the file's name, FFmpeg would also trust its extension and
    take random bytes called ``x.mp4`` for a broken MP4. FFmpeg logging is enabled (level ERROR) only while
    the container opens: stream probing decodes with one thread, while logging from decoder threads into
    Python can deadlock. PyAV drops a message equal to the previous one; here every message counts (the
    second truncated file in a worker logs what the first did).
    """
    level, skip_repeated = av.logging.get_level(), av.logging.get_skip_repeated()
    av.logging.set_level(av.logging.ERROR)
    av.logging.set_skip_repeated(False)
    try:
        with av.logging.Capture() as logs:
            unnamed = SimpleNamespace(read=file.read, seek=file.seek, tell=file.tell)
            return av.open(unnamed, "r", buffer_size=_IO_BUFFER_SIZE)
    except av.error.FFmpegError as e:
        if logs:  # a demuxer recognised the data and then failed on it
            raise DecodeError(f"truncated or corrupt: {_ffmpeg_message(e, logs[-1])}") from e
        raise DecodeError("not a video: unrecognised format") from e
    finally:
        av.logging.set_level(level)
        av.logging.set_skip_repeated(skip_repeated)


def _ffmpeg_message(exc: av.error.FFmpegError, log: tuple[int, str, str] | None = None) -> str:
    """FFmpeg's own message for ``exc``: the logged one (more specific) if there is one."""
    log = log or (exc.log[1] if exc.log else None)
    return log[2].strip() if log else str(exc.strerror)


def _video_stream(container: InputContainer, max_pixels: int) -> VideoStream:
    if not container.streams.video:
        raise DecodeError("not a video: no video stream")
    name = container.format.name
    kind = "an image" if name.endswith("_pipe") else _NOT_VIDEO.get(name)
    if kind:
        raise DecodeError(f"not a video: {kind} ({name.removesuffix('_pipe')})")
    stream = container.streams.video[0]
    _check_size(stream.codec_context.width, stream.codec_context.height, max_pixels)
    stream.codec_context.thread_count = 1  # one decoder thread per worker: Ray gives each actor its CPUs
    return stream


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise DecodeError(f"resolution {width}x{height} exceeds the limit of {max_pixels} pixels")


def _header_timing(container: InputContainer, stream: VideoStream) -> tuple[float, float, int] | None:
    """``(duration_s, fps, frame_count)`` from the header (a frame count inconsistent with duration and rate
    is replaced by their product), ``None`` if two of the three are unknown."""
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    if stream.duration:
        duration = float(stream.duration * stream.time_base)
    else:
        duration = container.duration / av.time_base if container.duration else 0.0
    count = stream.frames
    if fps > 0 and duration > 0:
        estimate = max(1, round(duration * fps))
        if not count or abs(count - estimate) > max(2, 0.05 * estimate):  # missing or wrong
            count = estimate
    elif count and fps > 0:
        duration = count / fps
    elif count and duration > 0:
        fps = count / duration
    else:
        return None
    return max(duration, count / fps), fps, count


def _scan_timing(container: InputContainer, stream: VideoStream) -> tuple[float, float, int]:
    """``(duration_s, fps, frame_count)`` by demuxing all of the stream's packets (reads the whole file)."""
    start, end, count = stream.start_time or 0, None, 0
    for packet in container.demux(stream):
        if packet.size:
            count += 1
            if packet.pts is not None:
                end = max(end or 0, packet.pts + (packet.duration or 0))
    if count == 0:
        raise DecodeError("no decodable frames")
    if end is not None and end > start:
        duration = float((end - start) * stream.time_base)
        return duration, count / duration, count
    rate = stream.average_rate or stream.guessed_rate  # no timestamps at all (raw streams)
    if not rate:
        raise DecodeError("unknown frame rate and duration")
    return count / float(rate), float(rate), count


def _decode_segments(
    container: InputContainer,
    stream: VideoStream,
    timing: tuple[float, float, int],
    *,
    num_frames: int,
    preprocessor: VideoPreprocessor,
    segment_s: float | None,
    thumbnail_size: int,
    max_pixels: int,
    max_forward_s: float,
) -> list[dict[str, Any]]:
    duration, fps, frame_count = timing
    reader = _FrameReader(container, stream, fps, max_pixels, max_forward_s)
    windows = segments(duration, segment_s) if segment_s else [(0.0, duration)]
    rows = []
    for number, (start_s, end_s) in enumerate(windows):
        first = min(math.ceil(start_s * fps - 1e-6), frame_count - 1)
        last = frame_count if number == len(windows) - 1 else math.ceil(end_s * fps - 1e-6)
        indices = segment_frame_indices(frame_count, num_frames, first, max(last, first + 1))
        frames = [reader.rgb_at(i / fps) for i in indices]
        height, width = frames[0].shape[:2]
        rows.append(
            {
                "segment": number,
                "start_s": start_s,
                "end_s": end_s,
                "duration_s": duration,
                "fps": fps,
                "frame_count": frame_count,
                "width": width,
                "height": height,
                "frames": _resize_crop(preprocessor, frames),
                "thumbnail": _thumbnail(frames[len(frames) // 2], thumbnail_size),
                "error": None,
            }
        )
    return rows


class _FrameReader:
    """RGB frames of a video stream at non-decreasing times, decoding forward and seeking over long gaps."""

    def __init__(
        self,
        container: InputContainer,
        stream: VideoStream,
        fps: float,
        max_pixels: int,
        max_forward_s: float,
    ):
        self.container, self.stream = container, stream
        self.time_base = float(stream.time_base)
        self.start = stream.start_time or 0
        self.period = 1.0 / fps
        self.max_pixels = max_pixels
        # frames are timed by counting them (in display order) where the container has no timestamps
        self.counted = container.format.name in _UNTIMED_FORMATS
        # seek only where the container has a keyframe index; elsewhere (MPEG-TS, raw streams) FFmpeg
        # seeks by bisecting on timestamps and may land past keyframes, even when seeking to the start
        self.max_forward_s = max_forward_s if container.format.name in _INDEXED_FORMATS else math.inf
        self.skip_before = -math.inf  # frames shown before this time are never picked: skip if unreferenced
        self.frames = self._decode()
        self.current: tuple[float, av.VideoFrame] | None = None  # the last decoded frame and its time
        self.rgb: tuple[float, np.ndarray] | None = None  # the last converted frame

    def rgb_at(self, target: float) -> np.ndarray:
        """uint8 ``(H, W, 3)`` RGB, display rotation applied, of the first frame whose time is at least
        ``target - period / 2`` (``target`` in seconds from the stream start, never decreasing)."""
        earliest = target - self.period / 2
        if self.current is None or self.current[0] < earliest:
            self.skip_before = -math.inf if self.counted else target - self.period
            if self._worth_seeking(target):
                self._seek(target)
            while self.current is None or self.current[0] < earliest:
                if not self._advance():
                    self._check_ended(target)
                    break
        time, frame = self.current
        if self.rgb is None or self.rgb[0] != time:
            self.rgb = time, _to_rgb(frame, self.max_pixels)
        return self.rgb[1]

    def _decode(self) -> Iterator[av.VideoFrame]:
        """Decode from the demuxer's position on. Frames that no other frame references (most B-frames) and
        that are shown before ``skip_before`` are not decoded at all: that changes no other frame. (Never
        where frames are counted: a skipped frame would not be counted.)"""
        context = self.stream.codec_context
        for packet in self.container.demux(self.stream):
            early = packet.pts is not None and self._seconds(packet.pts) < self.skip_before
            context.skip_frame = "NONREF" if early else "DEFAULT"
            yield from packet.decode()

    def _advance(self) -> bool:
        frame = next(self.frames, None)
        if frame is None:
            return False
        if frame.pts is not None and not self.counted:
            time = self._seconds(frame.pts)
        else:  # no timestamps: count frames, and never seek
            time = self.current[0] + self.period if self.current else 0.0
            self.max_forward_s = math.inf
        self.current = time, frame
        return True

    def _check_ended(self, target: float) -> None:
        """The stream ended before ``target``: the last frame stands in unless data is clearly missing."""
        if self.current is None:
            raise DecodeError("no decodable frames")
        reached = self.current[0]
        if target - reached > max(1.0, 2 * self.period):
            raise DecodeError(
                f"truncated or corrupt: video data ends at {reached:.2f} s, frame wanted at {target:.2f} s"
            )

    def _worth_seeking(self, target: float) -> bool:
        if self.current is None or target - self.current[0] <= self.max_forward_s:
            return False
        index = self.stream.index_entries
        if len(index) < 2:  # not loaded yet (Matroska reads its cues on the first seek): seek on distance
            return True
        # MP4 indexes decoding times, which precede presentation times by the reorder delay: by as much as
        # the first entry precedes the stream start
        lag = max(0, self.start - index[0].timestamp)
        i = index.search_timestamp(self._pts(target) - lag, backward=True)
        return i >= 0 and index[i].timestamp + lag > self._pts(self.current[0])

    def _seek(self, target: float) -> None:
        """Seek to the keyframe at or before ``target``. Should the demuxer land after the target (a broken
        index), start over from the beginning and decode forward only."""
        for pts in (self._pts(target), self.start):
            self.container.seek(pts, stream=self.stream, backward=True)
            self.frames = self._decode()
            self.current = None
            if self._advance() and self.current[0] <= target + self.period / 2:
                return
            self.max_forward_s = math.inf

    def _pts(self, seconds: float) -> int:
        return self.start + math.floor(seconds / self.time_base)

    def _seconds(self, pts: int) -> float:
        return (pts - self.start) * self.time_base


def _to_rgb(frame: av.VideoFrame, max_pixels: int) -> np.ndarray:
    _check_size(frame.width, frame.height, max_pixels)
    rgb = frame.to_ndarray(format="rgb24")
    if rgb.dtype != np.uint8 or rgb.shape != (frame.height, frame.width, 3) or min(rgb.shape) == 0:
        raise DecodeError(
            f"truncated or corrupt: decoded frame of shape {rgb.shape} for a "
            f"{frame.width}x{frame.height} picture"
        )
    turns = round(frame.rotation / 90) % 4  # counter-clockwise, like np.rot90
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _resize_crop(preprocessor: VideoPreprocessor, frames: list[np.ndarray]) -> np.ndarray:
    if len({f.shape for f in frames}) == 1:
        return preprocessor.resize_crop(np.stack(frames)).numpy()
    # the resolution changed within the segment: resize each frame on its own (same result per frame)
    return np.concatenate([preprocessor.resize_crop(f[None]).numpy() for f in frames])


def _thumbnail(frame: np.ndarray, size: int) -> bytes:
    """JPEG (quality 80) of ``frame`` with its shorter side resized to ``size``."""
    height, width = frame.shape[:2]
    scale = size / min(height, width)
    image = Image.fromarray(frame).resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR
    )
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80)
    return out.getvalue()
