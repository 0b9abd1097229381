"""The example videos sent to ``POST /search/like``: received into a temporary file, decoded in a process of
their own.

A video from the network is untrusted input to FFmpeg's native decoders: one that crashes them must cost a
decoder process, not the service. So uploads are decoded by the embed job's decoder processes
(:mod:`~pipeline.embed.decoder_processes`: fresh interpreters running the decode stage, no torch), started on
the first upload for each way of decoding (a library's frames and sampling) and kept; a process that dies is
replaced, and a video that kills :data:`MAX_TRIES` of them is refused with a 422. So is one that keeps a
decoder busy past the service's time limit (``ServiceOptions.max_decode_s``): its process is replaced.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import AsyncIterator

import numpy as np

from ...embed.decoder_processes import DecoderProcesses, DecodeTimedOut
from ...embed.stages.decode import DecodeSettings
from ..example import BadExample
from .errors import ApiError

PROCESSES = 2  # decoder processes per way of decoding: uploads decoded side by side
MAX_TRIES = 2  # decoder processes a video may kill before it is refused
PREFIX = "videosearch-upload-"  # the temporary files' names


@contextlib.asynccontextmanager
async def received(chunks: AsyncIterator[bytes], largest_mb: int) -> AsyncIterator[tuple[str, int]]:
    """The request body ``chunks`` in a temporary file, removed after the block: its path and size. A 413
    :class:`ApiError` once the body passes ``largest_mb`` MiB (the rest is not read); a 422 when it is
    empty."""
    handle, path = tempfile.mkstemp(prefix=PREFIX)
    try:
        size = 0
        with os.fdopen(handle, "wb") as file:
            async for chunk in chunks:
                size += len(chunk)
                if size > largest_mb * 2**20:
                    raise ApiError(413, f"the video is larger than {largest_mb} MiB: send a shorter clip")
                file.write(chunk)
        if not size:
            raise ApiError(422, "the request body holds no video")
        yield path, size
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class UploadDecoders:
    """Decoder processes for uploaded examples, one pool per :class:`DecodeSettings`, each video given at most
    ``time_limit_s`` seconds; thread-safe."""

    def __init__(self, time_limit_s: float) -> None:
        self.time_limit_s = time_limit_s
        self._pools: dict[str, DecoderProcesses] = {}  # by the settings' repr (a preprocessor is unhashable)
        self._lock = threading.Lock()

    def frames(self, path: str, settings: DecodeSettings, size: int) -> np.ndarray:
        """The model-ready frames of the video file at ``path`` (``size`` bytes), decoded by a decoder
        process as ``settings`` say. Raises :class:`BadExample` with the reason it cannot be."""
        row = {
            "uri": np.array([path], dtype=object),
            "size": np.array([size], dtype=np.int64),
            "etag": np.array([None], dtype=object),
            "mtime": np.array([None], dtype=object),
        }
        try:
            (decoded,) = self._pool(settings).decode(row)
        except DecodeTimedOut:
            raise BadExample(
                f"the video took longer than {self.time_limit_s:g} s to decode: send a shorter clip"
            ) from None
        if decoded["error"][0] is not None:
            raise BadExample(f"the video cannot be used as an example: {decoded['error'][0]}")
        return decoded["frames"][0]

    def _pool(self, settings: DecodeSettings) -> DecoderProcesses:
        with self._lock:
            key = repr(settings)
            if key not in self._pools:
                self._pools[key] = DecoderProcesses(
                    settings, None, PROCESSES, max_tries=MAX_TRIES, time_limit_s=self.time_limit_s
                )
            return self._pools[key]

    def close(self) -> None:
        """Stop every decoder process."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()
