"""Reading the frames a sampling wants from a video stream: forward decoding, seeking over long gaps.

Frames are chosen by time: the frame shown at time ``t`` is the first decoded frame whose time is at least
``t`` minus half a frame period (``fps`` the stream's average rate, times relative to the stream start); where
that frame starts more than half a period after ``t`` (a gap in a variable-frame-rate video: a screen
recording that stays still, dropped frames), the frame on screen at ``t``, the one before it. For a
constant-frame-rate video this is exactly frame ``round(t * fps)``; for a variable-frame-rate one it samples
uniformly in time. (AVI has no presentation timestamps: its frames are counted.) In MPEG transport and program
streams (:data:`RESTARTING_FORMATS`) the timestamps may start over (recordings joined end to end with ``cat``,
a DVD's VOB files, a clock that wraps): a frame timed before the one shown before it continues the timeline
one period after it, as a player shows it.

Seeking: the decoder runs forward and seeks (to the keyframe at or before the next frame wanted) only where
that skips decoding: in containers with a keyframe index (MP4/MOV, Matroska/WebM), when the next frame wanted
lies more than ``max_forward_s`` ahead and a keyframe lies between it and the current position. Elsewhere
(MPEG-TS, AVI, raw streams) it only decodes forward. Unreferenced frames (most B-frames) before the next
frame wanted are not decoded at all, by the decoders that can skip them one at a time
(:data:`SKIPPING_DECODERS`).

Fast sampling (``tolerance`` larger than half a frame): any frame within ``tolerance`` of the wanted time
will do, so the reader takes the cheapest one: a keyframe within reach, found in the container's index and
decoded alone after a seek (no frames before it), else the first frame decoded forward that reaches
``target - tolerance`` (fewer frames than the exact one). The time error stays within ``tolerance``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import av
import numpy as np
from av.container import InputContainer
from av.video.reformatter import VideoReformatter
from av.video.stream import VideoStream

from xclip_core.video_transforms import resize_output_size

INDEXED_FORMATS = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"}  # FFmpeg demuxers with keyframe indexes
UNTIMED_FORMATS = {"avi"}  # no presentation timestamps (with B-frames FFmpeg's guesses are out of order)
RESTARTING_FORMATS = {"mpegts", "mpeg"}  # FFmpeg demuxers whose timestamps may start over mid-file
# FFmpeg decoders that read ``skip_frame`` for each packet, so that unreferenced frames before a wanted one
# can be left undecoded without changing any other; libdav1d (AV1) reads it once, when it opens, and would
# then drop every unreferenced frame of the video: elsewhere every frame is decoded
SKIPPING_DECODERS = {"h264", "hevc", "mpeg4", "mpeg1video", "mpeg2video", "vp8", "vp9"}
# NVDEC's semi-planar picture layouts and the planar ones FFmpeg's software decoders give for the same streams
PLANAR_LAYOUTS = {"nv12": "yuv420p", "p010le": "yuv420p10le", "p016le": "yuv420p16le"}


class DecodeError(Exception):
    """A video cannot be decoded; the message is the short reason stored in the row's ``error``."""


def check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise DecodeError(f"resolution {width}x{height} exceeds the limit of {max_pixels} pixels")


class FrameReader:
    """The pictures of a video stream at non-decreasing times, decoding forward and seeking over long gaps."""

    def __init__(self, container: InputContainer, stream: VideoStream, fps: float, max_forward_s: float):
        self.container, self.stream = container, stream
        self.time_base = float(stream.time_base)
        self.start = stream.start_time or 0
        self.period = 1.0 / fps
        # frames are timed by counting them (in display order) where the container has no timestamps
        self.counted = container.format.name in UNTIMED_FORMATS
        # a skipped frame would not be counted, and only some decoders skip per packet
        self.may_skip = not self.counted and stream.codec_context.name in SKIPPING_DECODERS
        # seek only where the container has a keyframe index; elsewhere (MPEG-TS, raw streams) FFmpeg
        # seeks by bisecting on timestamps and may land past keyframes, even when seeking to the start
        self.max_forward_s = max_forward_s if container.format.name in INDEXED_FORMATS else math.inf
        self.restarts = container.format.name in RESTARTING_FORMATS
        self.shift = 0.0  # seconds added to the timestamps since they last started over
        self.last_dts: int | None = None
        self.skip_before = -math.inf  # frames shown before this time are never picked: skip if unreferenced
        self.frames = self._decode()
        self.current: tuple[float, av.VideoFrame] | None = None  # the last decoded frame and its time
        self.previous: tuple[float, av.VideoFrame] | None = None  # the one decoded before it, since a seek
        self.skipped_until = -math.inf  # the latest time of a frame left undecoded since the last seek

    def frame_at(self, target: float, tolerance: float | None = None) -> tuple[av.VideoFrame, float]:
        """The decoded picture shown within ``tolerance`` of ``target`` (seconds from the stream start, never
        decreasing), and its time. By default (exact sampling) it is the first frame whose time is at least
        ``target - period / 2``; a larger ``tolerance`` takes the cheapest frame within it (see the module
        docstring). :class:`RGBConverter` turns it into RGB."""
        exact = tolerance is None or tolerance <= self.period / 2
        earliest = target - (self.period / 2 if exact else tolerance)
        if self.current is None or self.current[0] < earliest:
            if self.may_skip:
                self.skip_before = target - self.period if exact else earliest
            keyframe = None if exact else self._keyframe_near(target, tolerance)
            if keyframe is not None:
                self._seek(keyframe)
            elif self._worth_seeking(target):
                self._seek(target)
            self._advance_to(earliest, target)
        if exact and self.current[0] > target + self.period / 2 and self.previous is not None:
            return self._on_screen(target, earliest)
        time, frame = self.current
        return frame, time

    def _advance_to(self, earliest: float, target: float) -> None:
        while self.current is None or self.current[0] < earliest:
            if not self._advance():
                self._check_ended(target)
                return

    def _on_screen(self, target: float, earliest: float) -> tuple[av.VideoFrame, float]:
        """The picture on screen at ``target`` where no frame starts within half a period of it: the last one
        before, which counts as shown at ``target``. The decoder may have skipped it (unreferenced frames
        before ``target - period`` are not decoded): then, where the container has a keyframe index, it
        decodes again from the keyframe before ``target``, every frame; elsewhere it takes the last frame it
        decoded, at that frame's own time. Either way it skips no frame for the rest of the video."""
        self.may_skip, self.skip_before = False, -math.inf
        if self.skipped_until > self.previous[0] and self.max_forward_s < math.inf:
            self._seek(target)
            self._advance_to(earliest, target)
        if self.previous is None or self.current[0] <= target + self.period / 2:  # (an index that lied)
            time, frame = self.current
            return frame, time
        time, frame = self.previous
        return frame, (target if self.skipped_until <= time else time)

    def _keyframe_near(self, target: float, tolerance: float) -> float | None:
        """The time of a keyframe within ``tolerance`` of ``target`` and ahead of the decoder (the nearest),
        from the container's index; ``None`` where there is none, or no index."""
        if self.max_forward_s == math.inf:  # no keyframe index (or it proved broken): decode forward
            return None
        index = self.stream.index_entries
        if len(index) < 2:
            return None
        lag = max(0, self.start - index[0].timestamp)  # decoding times precede presentation (see below)
        after = self.current[0] if self.current is not None else -math.inf
        best = None
        i = index.search_timestamp(self._pts(target + tolerance) - lag, backward=True)
        while i >= 0:
            entry = index[i]
            time = self._seconds(entry.timestamp + lag)
            if time < target - tolerance or time <= after:
                break
            nearer = best is None or abs(time - target) < abs(best - target)
            if entry.is_keyframe and time <= target + tolerance and nearer:
                best = time
            i -= 1
        return best

    def _decode(self) -> Iterator[av.VideoFrame]:
        """Decode from the demuxer's position on. Frames that no other frame references (most B-frames) and
        that are shown before ``skip_before`` are not decoded at all: that changes no other frame. (Only
        where :attr:`may_skip`.)"""
        context = self.stream.codec_context
        for packet in self.container.demux(self.stream):
            if self.restarts and packet.dts is not None:
                if self.last_dts is not None and packet.dts < self.last_dts:  # the timestamps start over:
                    self.may_skip, self.skip_before = False, -math.inf  # packets' times no longer compare
                self.last_dts = packet.dts
            early = packet.pts is not None and self._seconds(packet.pts) < self.skip_before
            context.skip_frame = "NONREF" if early else "DEFAULT"
            if early:  # its frame may not come out
                self.skipped_until = max(self.skipped_until, self._seconds(packet.pts))
            yield from packet.decode()

    def _advance(self) -> bool:
        frame = next(self.frames, None)
        if frame is None:
            return False
        if frame.pts is not None and not self.counted:
            time = self._seconds(frame.pts) + self.shift
            if self.restarts and self.current is not None and time < self.current[0]:  # started over
                self.shift += self.current[0] + self.period - time
                time = self.current[0] + self.period
        else:  # no timestamps: count frames, and never seek
            time = self.current[0] + self.period if self.current else 0.0
            self.max_forward_s = math.inf
        self.previous, self.current = self.current, (time, frame)
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
            self.current, self.previous, self.skipped_until = None, None, -math.inf
            if self._advance() and self.current[0] <= target + self.period / 2:
                return
            self.max_forward_s = math.inf

    def _pts(self, seconds: float) -> int:
        return self.start + math.floor(seconds / self.time_base)

    def _seconds(self, pts: int) -> float:
        return (pts - self.start) * self.time_base


def quarter_turns(frame: av.VideoFrame) -> int:
    """The picture's display rotation in quarter turns counter-clockwise (0-3), as ``np.rot90`` counts."""
    return round(frame.rotation / 90) % 4


def display_size(frame: av.VideoFrame) -> tuple[int, int]:
    """(height, width) of the picture as shown: its display rotation applied."""
    return (frame.width, frame.height) if quarter_turns(frame) % 2 else (frame.height, frame.width)


class RGBConverter:
    """Pictures -> uint8 ``(H, W, 3)`` RGB as shown (display rotation applied), at their own size; or, with
    ``shorter_side``, resized by FFmpeg's scaler (bilinear, filtering as it downscales) as it converts, to
    the size :func:`~xclip_core.video_transforms.resize_output_size` gives: one pass over the picture instead
    of a conversion at full size and a resize, within a few levels of Pillow's resize (not bit-exact).

    Pictures in NVDEC's semi-planar layouts (:data:`PLANAR_LAYOUTS`) are repacked to the software decoder's
    planar layout first, losslessly: converted to RGB directly, NV12 takes another path through the scaler,
    whose chroma interpolation gives other values (up to 44 levels at edges on 640x360 H.264).

    One converter serves the pictures of a video: it keeps FFmpeg's scaler contexts between them (creating one
    costs as much as a conversion). Not thread-safe.

    The scaler works on the calling thread (``threads=1``), as the decoder does: FFmpeg's default starts a
    thread per core for each context, so every decoder, one CPU's share, converted on all of the machine's
    cores, and spent 5-8 ms more CPU per 640x360 video (``bench/decode.py``: exact 54 against 60 ms, fast 19
    against 25)."""

    def __init__(self, max_pixels: int, shorter_side: int | None = None):
        self.max_pixels, self.shorter_side = max_pixels, shorter_side
        self.scaler, self.repacker = VideoReformatter(), VideoReformatter()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        check_size(frame.width, frame.height, self.max_pixels)
        planar = PLANAR_LAYOUTS.get(frame.format.name)
        if planar is not None:
            frame = self.repacker.reformat(frame, format=planar, threads=1)
        height, width = display_size(frame)
        if self.shorter_side is not None:
            height, width = resize_output_size(height, width, self.shorter_side)
        turns = quarter_turns(frame)
        coded = (width, height) if turns % 2 else (height, width)  # the size asked of the stored picture
        scaled = self.scaler.reformat(frame, coded[1], coded[0], "rgb24", interpolation="BILINEAR", threads=1)
        rgb = scaled.to_ndarray()
        if rgb.dtype != np.uint8 or rgb.shape != (*coded, 3) or min(rgb.shape) == 0:
            raise DecodeError(
                f"truncated or corrupt: decoded frame of shape {rgb.shape} for a "
                f"{frame.width}x{frame.height} picture"
            )
        return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb
