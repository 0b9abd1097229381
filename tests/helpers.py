"""What the tests share: real encoded videos, tiny reference models, and a moto S3 server.

Videos are written with PyAV and read back with decord (an independent decoder). PyAV's wheels here ship
``libx264`` (H.264) and ``mpeg4`` (MPEG-4 part 2) encoders. H.264 in yuv420p needs even dimensions, so
odd-sized H.264 videos are written in yuv444p (which decord decodes as well).

Models are tiny random ``transformers.XCLIPModel``s (the numerical reference) with every parameter moved off
its initialization: initial values such as LayerNorm weights of 1 and zero biases make parts of a model
identities that could hide a mis-wired parameter.

S3 is a real moto server spoken to over HTTP on 127.0.0.1, as in s3fs's own test suite.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import decord
import numpy as np
import torch
import transformers
from torch import nn

from pipeline.storage import StorageOptions

# ---------------------------------------------------------------------------------------------------- videos
PATTERNS = ("shapes", "noise")
_LIVE_FORMATS = {".mkv": "matroska", ".webm": "webm", ".ts": "mpegts"}


def pattern_frames(num_frames: int, width: int, height: int, pattern: str, seed: int) -> np.ndarray:
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
        (
            bool(rng.integers(2)),
            rng.integers(0, 256, 3),
            rng.uniform(0.1, 0.3) * min(width, height),
            rng.uniform(0, 1, 2) * (width, height),
            rng.uniform(-4, 4, 2),
        )
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
    return write_frames(path, pattern_frames(num_frames, width, height, pattern, seed), fps, codec)


def write_frames(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: int = 25,
    codec: str = "libx264",
    *,
    gop: int | None = None,
    rotation: int = 0,
    times: Sequence[float] | None = None,
    faststart: bool = False,
    live: bool = False,
    picture_first: np.ndarray | None = None,
    pix_fmt: str | None = None,
) -> str:
    """Encode uint8 ``(T, H, W, 3)`` RGB ``frames``; returns the path (the container follows its extension).

    ``gop``: keyframe interval in frames (the encoder's default otherwise). ``rotation``: display rotation
    in degrees, counter-clockwise (a phone's "rotate=90" portrait video is ``-90``), stored as a display
    matrix: FFmpeg 8 no longer turns a ``rotate`` metadata tag into one. ``times``: each frame's presentation
    time in seconds (variable frame rate, millisecond precision) instead of ``i / fps``. ``faststart``: put
    the MP4 index (``moov``) before the media data. ``live``: write through a non-seekable output, as a
    live recording does: Matroska then has no duration and no index (MP4 needs a seekable output).
    ``picture_first``: a track of this one JPEG picture before the video's (an unmarked cover). ``pix_fmt``:
    the encoded pixel format (default: 4:2:0, or 4:4:4 for H.264 at an odd size).
    """
    path = os.fspath(path)
    _, height, width, _ = frames.shape
    odd = width % 2 or height % 2
    options = {"movflags": "faststart"} if faststart else {}
    with contextlib.ExitStack() as stack:
        if live:
            output, muxer = stack.enter_context(_Unseekable(path)), _LIVE_FORMATS[os.path.splitext(path)[1]]
        else:
            output, muxer = path, None
        container = stack.enter_context(av.open(output, "w", format=muxer, options=options))
        picture = [] if picture_first is None else picture_stream(container, picture_first, False)
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt or ("yuv444p" if codec == "libx264" and odd else "yuv420p")
        if gop:
            stream.codec_context.gop_size = gop
        if rotation:
            stream.set_display_rotation(rotation)
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for packet in picture:
            container.mux(packet)
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if times is not None:
                video_frame.pts, video_frame.time_base = round(times[i] * 1000), Fraction(1, 1000)
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return path


def picture_stream(container: av.container.OutputContainer, picture: np.ndarray, attached: bool) -> list:
    """Add a stream of one JPEG ``picture`` (uint8 ``(H, W, 3)`` RGB) to ``container``, marked as an attached
    picture (a cover, as album art is stored) where ``attached``; returns its packets, to mux once every
    stream is added."""
    height, width, _ = picture.shape
    stream = container.add_stream("mjpeg", rate=1)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
    if attached:
        stream.disposition = av.stream.Disposition.attached_pic
    return [*stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")), *stream.encode()]


class _Unseekable(io.RawIOBase):
    """A write-only file that cannot seek."""

    def __init__(self, path: str):
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()
        super().close()


def write_audio(path: str | os.PathLike, seconds: float = 1.0, rate: int = 16000, cover: bool = False) -> str:
    """Encode ``seconds`` of a 440 Hz tone as AAC, an audio-only file (container from the extension);
    ``cover``: with a cover picture (a JPEG as an attached picture, as album art is stored)."""
    path = os.fspath(path)
    with av.open(path, "w") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        cover_packets = picture_stream(container, np.full((64, 64, 3), 90, np.uint8), True) if cover else []
        for packet in cover_packets:
            container.mux(packet)
        t = np.arange(int(seconds * rate)) / rate
        samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for start in range(0, len(samples) - 1023, 1024):
            chunk = samples[None, start : start + 1024]
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def decode_frames(path: str | os.PathLike, indices: list[int] | None = None) -> np.ndarray:
    """Decode all frames (or those at ``indices``) with decord as uint8 (N, H, W, 3) RGB."""
    reader = decord.VideoReader(os.fspath(path))
    return reader.get_batch(list(range(len(reader))) if indices is None else indices).asnumpy()


def decoded_batch(frames: list[np.ndarray | None], errors: list[str | None]) -> dict[str, np.ndarray]:
    """Decoded rows as a Ray numpy batch; ``frames`` as an object column (rows of different shapes)."""
    rows = len(frames)
    column = np.empty(rows, dtype=object)
    for i, video in enumerate(frames):
        column[i] = video
    return {
        "uri": np.array([f"s3://bucket/v{i}.mp4" for i in range(rows)], dtype=object),
        "size": np.arange(rows) + 1000,
        "etag": np.array([f"etag{i}" for i in range(rows)], dtype=object),
        "mtime": np.full(rows, 1.7e9),
        "segment": np.zeros(rows, np.int64),
        "start_s": np.zeros(rows),
        "end_s": np.full(rows, 4.0),
        "duration_s": np.full(rows, 4.0),
        "fps": np.full(rows, 25.0),
        "frame_count": np.full(rows, 100),
        "width": np.full(rows, 64),
        "height": np.full(rows, 48),
        "sample_error_s": np.full(rows, 0.01),
        "frames": column,
        "thumbnail": np.array([b"\xff\xd8jpeg" if e is None else b"" for e in errors], dtype=object),
        "error": np.array(errors, dtype=object),
    }


# ---------------------------------------------------------------------------------------------------- models
def perturbed(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Add Gaussian noise of ``scale`` to every parameter (uses the global torch seed); returns ``model``."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale)
    return model.eval()


def reference_model(text: dict, vision: dict, seed: int = 0, **config) -> transformers.XCLIPModel:
    """A perturbed ``transformers.XCLIPModel`` (the numerical reference) of the given small geometry."""
    torch.manual_seed(seed)
    return perturbed(
        transformers.XCLIPModel(transformers.XCLIPConfig(text_config=text, vision_config=vision, **config))
    )


# ------------------------------------------------------------------------------------------------------- S3
# Dummy credentials for the moto server, no proxy for it; what could point botocore elsewhere is cleared.
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
AWS_CLEARED = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoS3:
    """A running moto S3 server."""

    endpoint_url: str
    options: StorageOptions

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a bucket with a fresh unique name and return the name."""
        import s3fs

        name = f"{prefix}-{uuid.uuid4().hex[:16]}"
        s3fs.S3FileSystem(endpoint_url=self.endpoint_url, skip_instance_cache=True).mkdir(name)
        return name


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate ``proc``; kill it if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {url} in {timeout:.0f} s:\n{log.read_text()[-2000:]}")


# ---------------------------------------------------------------------------------------------------- the CLI
CLI_TIMEOUT = 300  # seconds for one CLI job (a local Ray starts in each)


def cli_env() -> dict[str, str]:
    """The environment of a CLI run: the moto test credentials, nothing that points AWS or Ray elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in AWS_CLEARED}
    env.update(AWS_TEST_ENV)
    env["RAY_ADDRESS"] = "local"  # a fresh local Ray per job, never a cluster someone started on this host
    return env


def videosearch(*args: str | os.PathLike) -> list[str]:
    """The command line of the installed ``videosearch`` script (``python -m pipeline.cli`` without one)."""
    script = Path(sys.executable).with_name("videosearch")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]
    return command + [os.fspath(a) for a in args]


@dataclass
class Run:
    args: list[str]
    code: int
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> Any:
        assert self.code == 0, f"{' '.join(self.args)} exited with {self.code}:\n{self.stderr[-4000:]}"
        return json.loads(self.stdout)


def run(
    *args: str | os.PathLike,
    cwd: str | os.PathLike | None = None,
    timeout: float = CLI_TIMEOUT,
    env: dict[str, str] | None = None,
) -> Run:
    """Run ``videosearch ARGS`` in :func:`cli_env` (with ``env`` added)."""
    command = videosearch(*args)
    start = time.monotonic()
    environment = cli_env() | (env or {})
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=environment, timeout=timeout)
    return Run(command, done.returncode, done.stdout, done.stderr, time.monotonic() - start)


def run_all(commands: dict[str, list[str | os.PathLike]], timeout: float = 120) -> dict[str, Run]:
    """Run CLI invocations concurrently (those that fail before Ray starts are mostly Python imports)."""
    started = {}
    for name, args in commands.items():
        command = videosearch(*args)
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env()
        )
        started[name] = (command, time.monotonic(), proc)
    runs = {}
    try:
        for name, (command, start, proc) in started.items():
            stdout, stderr = proc.communicate(timeout=timeout)
            runs[name] = Run(command, proc.returncode, stdout, stderr, time.monotonic() - start)
    finally:
        for _, _, proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return runs


def compiled_graphs_from_here() -> collections.Counter:
    """Reset torch.compile as in a new process and zero its counters (``torch._dynamo.reset`` leaves them);
    the returned counter's ``["unique_graphs"]`` then counts the graphs compiled from here on."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch._dynamo.utils.counters["stats"]


class DecoderKiller(threading.Thread):
    """Kills (SIGKILL, as a crash in native decoder code ends a process) every decoder process (one whose
    command line holds ``title``) that has ``poison`` open (a path, or a string that the name of a file it
    has open starts with), whenever one does; ``killed`` holds their pids."""

    def __init__(self, poison: Path | str, title: bytes):
        super().__init__(daemon=True)
        self.poison = str(poison.resolve()) if isinstance(poison, Path) else None
        self.prefix = poison if isinstance(poison, str) else None
        self.title = title
        self.killed: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.005):
            for pid in self._decoders() - self.killed:
                if self._has_poison_open(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        self.killed.add(pid)

    def _decoders(self) -> set[int]:
        pids = set()
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and self.title in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
        return pids

    def _prefixed(self, name: str) -> bool:
        return self.prefix is not None and os.path.basename(name).startswith(self.prefix)

    def _has_poison_open(self, pid: int) -> bool:
        with contextlib.suppress(OSError):
            names = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
            return any(name == self.poison or self._prefixed(name) for name in names)
        return False


def nvdec_available() -> bool:
    """Whether FFmpeg opens a CUDA device here for NVDEC (an NVIDIA GPU and its driver; CI has none)."""
    from pipeline.embed.stages.decode import open_cuda_decoder

    try:
        open_cuda_decoder()
    except ValueError:
        return False
    return True


def part_row(
    id_: int,
    uri: str,
    segment: int,
    ok: bool,
    rng: np.random.Generator,
    shapes: tuple[int, int | None],
    model_tag: str,
    duration_s: float,
) -> dict[str, Any]:
    """One row of a library part as a job writes it: segment ``segment`` (1 s) of a 320x240 25-fps video, a
    random unit embedding of ``shapes[0]`` values and ``shapes[1]`` random re-rank values (None: the family
    has none); an error row, without them, where not ``ok``."""
    dim, prompt_width = shapes
    embedding = rng.standard_normal(dim)
    row = {
        "id": id_,
        "uri": uri,
        "size": 100,
        "etag": "e",
        "mtime": 1.0,
        "segment": segment,
        "start_s": float(segment),
        "end_s": segment + 1.0,
        "duration_s": duration_s,
        "fps": 25.0,
        "frame_count": int(25 * duration_s),
        "width": 320,
        "height": 240,
        "thumbnail": b"jpg" if ok else None,
        "error": None if ok else "broken",
        "embedding": (embedding / np.linalg.norm(embedding)).tolist() if ok else None,
        "model_id": model_tag if ok else None,
    }
    if prompt_width:
        row["prompt_features"] = rng.standard_normal(prompt_width).tolist() if ok else None
    return row
