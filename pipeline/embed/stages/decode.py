"""Decode stage: listed objects -> model-ready frames, one row per segment of each video (schema ``DECODED``).

Videos are read with PyAV through the fsspec file object (``av.open(fs.open(path))``). s3fs files are
seekable and fetch byte ranges on demand, so only the container index and the stretches of the stream that
hold the sampled frames are downloaded. decord is not used here: its Python API reads a file object whole
into memory before decoding (and builds its frame index by demuxing every packet), which for an object store
means downloading every video entirely even when 8 frames of it are needed.

The ``i``-th frame index of X-CLIP's sampling (:func:`segment_frame_indices`) stands for the time ``i / fps``;
:class:`~pipeline.embed.stages.frame_reader.FrameReader` finds the frame shown then, seeking where that saves
decoding.

``device="cuda"`` decodes on the GPU's video decoder (NVDEC) through FFmpeg's CUDA hwaccel, which PyAV's
wheels carry: the compressed stream goes to the GPU, each decoded picture comes back to host memory (as NV12,
repacked to the software decoder's planar layout), and the frames are converted, resized and cropped as on the
CPU. Streams NVDEC cannot decode (a codec or profile it lacks) fall back to FFmpeg's software decoder.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import IO, Any

import av
import av.logging
import numpy as np
from av.codec.hwaccel import HWAccel
from av.container import InputContainer
from av.stream import Disposition
from av.video.stream import VideoStream
from PIL import Image

from xclip_core.sampling import segment_frame_indices, segments
from xclip_core.video_transforms import VideoPreprocessor

from ...flags import NodeSettingError, check_choice
from ...library.schema import DECODED, LISTED
from ...storage import StorageOptions, StorageUnavailable, Store, translate_error
from ..options import DECODE_DEVICES, SAMPLINGS
from .frame_reader import (
    RESTARTING_FORMATS,
    DecodeError,
    FrameReader,
    RGBConverter,
    check_size,
    display_size,
)

S3_BLOCK_SIZE = 1 << 20  # bytes fetched per ranged read of a remote object
MAX_PIXELS = 8192 * 4320  # frames larger than 8K are refused, not decoded
MAX_FORWARD_S = 1.0  # decode forward rather than seek when the next frame is at most this far ahead
SEGMENTS_PER_BATCH = 16  # rows a decoder hands on at once (16 x 8 frames x 224 px: 19 MB)
READ_TRIES = 2  # a video whose reading fails transiently (after the store's own retries) is decoded again
RETRY_WAIT_S = 1.0  # before the second try; doubled before each later one
_IO_BUFFER_SIZE = 32 << 10  # bytes PyAV asks the file object for per read
# demuxers whose "video" is a picture; the image ones read by content are all named "<codec>_pipe". (A GIF is
# read as a video: animated GIFs are short clips.)
# FFmpeg's CUDA device on the device's primary context: retained once per process (DecodeVideos keeps one),
# it makes opening each video's NVDEC decoder cheap
_CUDA_OPTIONS = {"primary_ctx": "1"}
_NVDEC_LAYOUTS = ("nv12", "p010le", "p016le")  # NVDEC's pictures in host memory: 8, 10, 12 bits
_NOT_VIDEO = {"ico": "an image"}  # demuxers that probe by content and find no video (images: *_pipe)
_INT_COLUMNS = ("segment", "frame_count", "width", "height")
_FLOAT_COLUMNS = ("start_s", "end_s", "duration_s", "fps", "sample_error_s")


@dataclass(frozen=True)
class DecodeSettings:
    """How videos are decoded: the same for every video of a job.

    ``num_frames`` frames per video (or per segment of ``segment_s`` seconds), resized and centre-cropped by
    ``preprocessor.resize_crop``; a JPEG thumbnail whose shorter side is ``thumbnail_size``; frames larger
    than ``max_pixels`` refused; seeking only when the next frame wanted lies more than ``max_forward_s``
    ahead. ``sampling``: ``"exact"`` (X-CLIP's uniform sampling: the frame shown at each wanted time) or
    ``"fast"`` (the cheapest frame within half the sampling interval of each wanted time: a keyframe where
    one is that close, see :mod:`~pipeline.embed.stages.frame_reader`; resized by FFmpeg's scaler as it is
    converted, within a few levels of the preprocessor's resize). Each row records its largest time
    error (``sample_error_s``). ``device``: ``"cpu"`` (FFmpeg's software decoders) or ``"cuda"`` (NVDEC, see
    the module docstring).
    """

    num_frames: int
    preprocessor: VideoPreprocessor
    segment_s: float | None = None
    sampling: str = "exact"
    device: str = "cpu"
    thumbnail_size: int = 160
    max_pixels: int = MAX_PIXELS
    max_forward_s: float = MAX_FORWARD_S

    def __post_init__(self) -> None:
        check_choice("--sampling", self.sampling, SAMPLINGS)
        check_choice("--decode-device", self.device, DECODE_DEVICES)

    @property
    def frames_shape(self) -> tuple[int, int, int, int]:
        """The shape of one row's ``frames``: (num_frames, crop height, crop width, 3)."""
        height, width = self.preprocessor.crop_size
        return self.num_frames, height, width, 3


def open_video(video: Store, block_size: int = S3_BLOCK_SIZE) -> IO[bytes]:
    """A seekable binary file object for the object ``video``. Remote objects fetch ``block_size`` ranges on
    demand (``readahead`` cache: one block kept, no whole-file caching); storage failures raise
    ``StorageError``."""
    kwargs = {} if video.is_local else {"block_size": block_size, "cache_type": "readahead"}
    return video.open("", "rb", **kwargs)


class _WatchedFile:
    """A file object that remembers the first failure its reads raised: FFmpeg may turn a read error into
    "end of file" or "invalid data", and a storage failure must never be reported as a bad video."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.failure: Exception | None = None

    def read(self, size: int = -1) -> bytes:
        return self._watched(self.file.read, size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._watched(self.file.seek, offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def seekable(self) -> bool:
        return True

    def _watched(self, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except Exception as e:
            self.failure = self.failure or e
            raise


def decode_video(
    video: str | os.PathLike | Store | IO[bytes],
    settings: DecodeSettings,
    options: StorageOptions | None = None,
) -> list[dict[str, Any]]:
    """Decode one video into one row per segment (one row when ``settings.segment_s`` is None).

    ``video`` is an object's URI (with ``options``) or :class:`~pipeline.storage.Store` (opened with
    :func:`open_video`), or a seekable binary file object. Each row has the ``DECODED`` columns except the
    listing's (``uri``, ``size``, ``etag``, ``mtime``), ``error`` None and ``frames`` uint8
    ``settings.frames_shape``. A video that cannot be decoded raises :class:`DecodeError` (or the underlying
    error; see :func:`error_reason`). :func:`iter_segments` gives the rows one at a time.
    """
    return list(iter_segments(video, settings, options))


def iter_segments(
    video: str | os.PathLike | Store | IO[bytes],
    settings: DecodeSettings,
    options: StorageOptions | None = None,
) -> Iterator[dict[str, Any]]:
    """The rows of :func:`decode_video`, each as soon as its segment is decoded: memory does not grow with
    the video's length. An error can come after some rows (a video truncated in its middle)."""
    if isinstance(video, str | os.PathLike):
        video = Store(video, options)
    if isinstance(video, Store):
        with open_video(video) as f:
            watched = _WatchedFile(f)
            try:
                yield from iter_segments(watched, settings)
            except Exception as e:
                if watched.failure is None or watched.failure is e:
                    raise
                raise watched.failure from e  # what went wrong, whatever the decoder made of it
        return
    if video.seek(0, os.SEEK_END) == 0:
        raise DecodeError("empty object")
    video.seek(0)
    with _open_container(video, settings.device) as container:
        stream = _video_stream(container, settings.max_pixels)
        restarting = container.format.name in RESTARTING_FORMATS  # its header cannot know: read every packet
        timing = None if restarting else _header_timing(container, stream)
        if timing is not None:
            yield from _decode_segments(container, stream, timing, settings)
            return
        timing = _scan_timing(container, stream, restarting)  # the header lacks duration or rate
    video.seek(0)  # and start over (raw streams cannot seek back)
    with _open_container(video, settings.device) as container:
        yield from _decode_segments(
            container, _video_stream(container, settings.max_pixels), timing, settings
        )


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

    Decoding on ``"cuda"`` (``settings.device``) needs FFmpeg to open a CUDA device where the callable is
    constructed: a node without one raises :class:`~pipeline.flags.NodeSettingError` there, before any video,
    and so does a call whose video fails to open while the device cannot be opened again (a GPU lost
    mid-job): the job stops instead of recording good videos as corrupt.
    """

    def __init__(
        self,
        settings: DecodeSettings,
        storage_options: StorageOptions | None = None,
        crash_ledger: Any = None,
        max_tries: int = 3,
    ):
        self.settings = settings
        self.storage_options = storage_options
        self.crash_ledger = crash_ledger
        self.max_tries = max_tries
        self._cuda = open_cuda_decoder() if settings.device == "cuda" else None  # kept: see _CUDA_OPTIONS

    def __call__(self, batch: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
        """Decode every video of ``batch`` (columns ``uri``, ``size``, ``etag``, ``mtime``); the rows come in
        batches of at most :data:`SEGMENTS_PER_BATCH`, so that a long video's segments never sit in memory
        together. A video that fails after some of its segments were handed on gets its error row too (the
        embed job then keeps only the error row: a video enters a library whole or as its error).

        A store that fails transiently through all its retries is not the video's fault: the video is decoded
        again (:data:`READ_TRIES` times in all, waiting :data:`RETRY_WAIT_S`, then twice as long...), and
        when the store still fails, :class:`~pipeline.storage.StorageUnavailable` is raised: the job stops
        and publishes nothing rather than record good videos as failed."""
        listed = {name: np.asarray(batch[name]) for name in LISTED}
        sources: list[int] = []  # the input row of each output row
        rows: list[dict[str, Any]] = []
        handed_on = 0  # batches yielded so far
        for i, uri in enumerate(listed["uri"]):
            tries = self.crash_ledger.begin(str(uri)) if self.crash_ledger is not None else 0
            for attempt in range(1, READ_TRIES + 1):
                first, handed_on_before = len(rows), handed_on
                try:
                    if tries >= self.max_tries:
                        raise DecodeError(f"the decoder crashed on this video {tries} times; not retried")
                    if listed["size"][i] == 0:
                        raise DecodeError("empty object")
                    for row in iter_segments(Store(str(uri), self.storage_options), self.settings):
                        rows.append(row)
                        sources.append(i)
                        if len(rows) == SEGMENTS_PER_BATCH:
                            yield self._columns(listed, sources, rows)
                            rows, sources, handed_on = [], [], handed_on + 1
                    break
                except NodeSettingError:  # the node's fault, not the video's: the job stops
                    raise
                except Exception as e:  # noqa: BLE001 - any failure becomes this video's error row
                    failure = translate_error(e, str(uri), "reading", self.storage_options)
                    if isinstance(failure, StorageUnavailable):
                        if attempt == READ_TRIES or handed_on != handed_on_before:
                            raise failure from e
                        del rows[first:], sources[first:]
                        time.sleep(RETRY_WAIT_S * 2 ** (attempt - 1))
                        continue
                    rows.append(self._error_row(error_reason(e, str(uri), self.storage_options)))
                    sources.append(i)
                    break
            if self.crash_ledger is not None:
                self.crash_ledger.end(str(uri))
        if rows or not handed_on:
            yield self._columns(listed, sources, rows)

    def decode(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """All of :meth:`__call__`'s rows in one batch (for use in one process, without Ray)."""
        chunks = list(self(batch))
        return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}

    def _columns(
        self, listed: dict[str, np.ndarray], sources: list[int], rows: list[dict[str, Any]]
    ) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {name: column[sources] for name, column in listed.items()}
        for name in DECODED[len(LISTED) :]:
            values = [row[name] for row in rows]
            if name == "frames":
                empty = np.zeros((0, *self.settings.frames_shape), np.uint8)
                out[name] = np.stack(values) if values else empty
            elif name in _INT_COLUMNS:
                out[name] = np.array(values, dtype=np.int64)
            elif name in _FLOAT_COLUMNS:
                out[name] = np.array(values, dtype=np.float64)
            else:  # bytes and optional strings: object arrays (numpy's own bytes type would strip b"\0")
                out[name] = np.empty(len(values), dtype=object)
                out[name][:] = values
        return out

    def _error_row(self, reason: str) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(_INT_COLUMNS, 0) | dict.fromkeys(_FLOAT_COLUMNS, math.nan)
        frames = np.zeros(self.settings.frames_shape, np.uint8)
        return row | {"frames": frames, "thumbnail": b"", "error": reason}


def open_cuda_decoder() -> HWAccel:
    """FFmpeg's CUDA device for H.264 decoding, opened here; :class:`~pipeline.flags.NodeSettingError` saying
    what to do where it cannot be (no NVIDIA GPU or driver visible to this process)."""
    try:
        return HWAccel("cuda", options=_CUDA_OPTIONS).create(av.codec.Codec("h264", "r"))
    except Exception as e:  # noqa: BLE001 - FFmpeg's errors vary by what is missing; all mean the same here
        raise NodeSettingError(
            f"--decode-device cuda: FFmpeg cannot open a CUDA device here ({type(e).__name__}: {e}); NVDEC "
            "needs an NVIDIA GPU and its driver visible to the decoders (or use --decode-device cpu)"
        ) from e


def nvdec_decodes(path: str) -> bool:
    """Whether NVDEC decodes the local video ``path`` (its first picture comes back from the GPU in NVDEC's
    layout), not FFmpeg's software decoder, which takes over for a codec or profile NVDEC lacks or when
    NVDEC's decoder fails to start (``HWAccel.is_hwaccel`` says True either way)."""
    with av.open(path, hwaccel=HWAccel("cuda", options=_CUDA_OPTIONS)) as container:
        return next(container.decode(video=0)).format.name in _NVDEC_LAYOUTS


def _open_container(file: IO[bytes], device: str = "cpu") -> InputContainer:
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
            hwaccel = HWAccel("cuda", options=_CUDA_OPTIONS) if device == "cuda" else None
            return av.open(unnamed, "r", buffer_size=_IO_BUFFER_SIZE, hwaccel=hwaccel)
    except av.error.FFmpegError as e:
        if device == "cuda":  # FFmpeg opens the CUDA device with the video: its failing is no video's fault
            open_cuda_decoder()
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
    """The stream FFmpeg finds best among the video streams that are not a cover picture (an attached
    picture: an audio file's album art, a download's embedded thumbnail), as decord, the reference's
    reader, picks it (``av_find_best_stream``)."""
    moving = [s for s in container.streams.video if not s.disposition & Disposition.attached_pic]
    if not moving:
        cover = " (only a cover picture)" if container.streams.video else ""
        raise DecodeError(f"not a video: no video stream{cover}")
    name = container.format.name
    kind = "an image" if name.endswith("_pipe") else _NOT_VIDEO.get(name)
    if kind:
        raise DecodeError(f"not a video: {kind} ({name.removesuffix('_pipe')})")
    best = container.streams.best("video")
    stream = best if best in moving else moving[0]
    check_size(stream.codec_context.width, stream.codec_context.height, max_pixels)
    stream.codec_context.thread_count = 1  # one decoder thread per worker: Ray gives each actor its CPUs
    return stream


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


def _scan_timing(
    container: InputContainer, stream: VideoStream, restarting: bool = False
) -> tuple[float, float, int]:
    """``(duration_s, fps, frame_count)`` by demuxing all of the stream's packets (reads the whole file).
    ``restarting``: the timestamps may start over (:data:`~.frame_reader.RESTARTING_FORMATS`); where the
    decoding times go back, a new piece of the timeline begins, and the pieces' durations add up."""
    pieces: list[list[int]] = []  # [first pts, end pts] of each piece, the first from the stream's start
    count, last_dts = 0, None
    for packet in container.demux(stream):
        if not packet.size:
            continue
        count += 1
        if packet.pts is None:
            continue
        went_back = restarting and None not in (packet.dts, last_dts) and packet.dts < last_dts
        if not pieces:
            pieces.append([stream.start_time or 0, stream.start_time or 0])
        elif went_back:
            pieces.append([packet.pts, packet.pts])
        elif len(pieces) > 1:  # a later piece starts at its earliest picture (B-frames come after it)
            pieces[-1][0] = min(pieces[-1][0], packet.pts)
        pieces[-1][1] = max(pieces[-1][1], packet.pts + (packet.duration or 0))
        last_dts = packet.dts if packet.dts is not None else last_dts
    if count == 0:
        raise DecodeError("no decodable frames")
    span = sum(end - first for first, end in pieces)
    if span > 0:
        duration = float(span * stream.time_base)
        return duration, count / duration, count
    rate = stream.average_rate or stream.guessed_rate  # no timestamps at all (raw streams)
    if not rate:
        raise DecodeError("unknown frame rate and duration")
    return count / float(rate), float(rate), count


def _decode_segments(
    container: InputContainer, stream: VideoStream, timing: tuple[float, float, int], settings: DecodeSettings
) -> Iterator[dict[str, Any]]:
    duration, fps, frame_count = timing
    reader = FrameReader(container, stream, fps, settings.max_forward_s)
    pre = settings.preprocessor
    # exact: each picture converted at its own size, then resized and cropped as the reference processor
    # does (bit-exact); fast: FFmpeg's scaler resizes as it converts (a seventh of the cost, within a few
    # levels of the reference), then the crop alone
    fast_resize = settings.sampling == "fast" and pre.do_resize
    to_model = RGBConverter(settings.max_pixels, pre.size if fast_resize else None)
    resize_crop = pre.crop if fast_resize else pre.resize_crop
    to_thumbnail = RGBConverter(settings.max_pixels, settings.thumbnail_size)
    segment_s = settings.segment_s
    windows = segments(duration, segment_s) if segment_s else [(0.0, duration)]
    for number, (start_s, end_s) in enumerate(windows):
        first = min(math.ceil(start_s * fps - 1e-6), frame_count - 1)
        last = frame_count if number == len(windows) - 1 else math.ceil(end_s * fps - 1e-6)
        indices = segment_frame_indices(frame_count, settings.num_frames, first, max(last, first + 1))
        # fast: any frame within half the sampling interval (it stays in its own slot of the segment)
        tolerance = (max(last, first + 1) - first) / fps / settings.num_frames / 2
        frames, error = [], 0.0
        for slot, index in enumerate(indices):
            picture, time = reader.frame_at(index / fps, tolerance if settings.sampling == "fast" else None)
            frames.append(resize_crop(to_model(picture)[None])[0])
            error = max(error, abs(time - index / fps))
            if slot == 0:
                height, width = display_size(picture)
            if slot == len(indices) // 2:
                thumbnail = _jpeg(to_thumbnail(picture))
        yield (
            {
                "segment": number,
                "start_s": start_s,
                "end_s": end_s,
                "duration_s": duration,
                "fps": fps,
                "frame_count": frame_count,
                "width": width,
                "height": height,
                "sample_error_s": error,
                "frames": np.stack(frames),
                "thumbnail": thumbnail,
                "error": None,
            }
        )


def _jpeg(rgb: np.ndarray) -> bytes:
    """JPEG (quality 80) of a thumbnail."""
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, "JPEG", quality=80)
    return out.getvalue()
