"""A file on remote storage read forward through windows of ranges fetched at once.

One GET streams from S3 at about 100 MB/s, and a checkpoint read tensor after tensor through an fsspec file
sends one ranged GET after another: it loads at that rate (base-patch32's 786 MB in ~8 s, on every encoder
actor that starts). :class:`AheadReader` fetches the next :data:`CHUNK` x :data:`AT_ONCE` bytes as
:data:`AT_ONCE` ranges at once (fsspec's ``cat_ranges``, concurrent on s3fs) whenever a read leaves the
window it holds, so that a reader moving forward through the file gets the streams' sum, for the memory of
one window. (s3fs reads a whole object so too, 50 MB ranges 10 at once; a checkpoint is read tensor by
tensor into the parameters, never whole.)
"""

from __future__ import annotations

import io
import os
from typing import Any

CHUNK = 32 << 20  # bytes of one range
AT_ONCE = 8  # ranges fetched at once: a window of 256 MiB (bench/large_reads.py: 32 MiB x 8 beat 16 x 16)


class AheadReader(io.RawIOBase):
    """The file ``path`` of ``size`` bytes on the fsspec filesystem ``fs``, for reading (``seek`` and
    ``readinto``; reads are cheapest in file order)."""

    def __init__(self, fs: Any, path: str, size: int) -> None:
        super().__init__()
        self.fs, self.path, self.size = fs, path, size
        self._position = 0
        self._start = 0  # where the window lies in the file
        self._window = memoryview(b"")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        if self._position >= self.size:
            return 0
        if not self._start <= self._position < self._start + len(self._window):
            self._fetch(self._position)
        offset = self._position - self._start
        count = min(len(buffer), len(self._window) - offset)
        memoryview(buffer).cast("B")[:count] = self._window[offset : offset + count]
        self._position += count
        return count

    def _fetch(self, start: int) -> None:
        starts = list(range(start, min(start + CHUNK * AT_ONCE, self.size), CHUNK))
        ends = [min(begin + CHUNK, self.size) for begin in starts]
        self._window = memoryview(b"")  # the old window let go before the new one is fetched
        pieces = self.fs.cat_ranges([self.path] * len(starts), starts, ends, on_error="raise")
        self._start, self._window = start, memoryview(b"".join(pieces))
