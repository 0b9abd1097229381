"""A Parquet file on remote storage read in few requests: its tail (the footer) first, then the byte ranges of
the column chunks a read needs, near ones fetched as one range and all of them at once.

Arrow does this itself when it pre-buffers, on its own IO threads; a Python file must not be read there
(:data:`pipeline.library.reader.CHECKED_PARQUET`), so the ranges are fetched here, in the calling thread, and
Arrow reads them from memory. Whatever else it asks for (a footer longer than the tail, a column not
planned) is fetched when asked: a plan that missed costs a request, never a wrong byte.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ..storage import RangeNotSatisfiable, Store

TAIL_BYTES = 64 * 1024  # the first read: Arrow's own first read of a footer
GAP_BYTES = 64 * 1024  # column chunks nearer to each other than this are fetched as one range

Fetch = Callable[[list[int], list[int]], list[bytes]]  # (starts, ends) -> the bytes of each range


class KnownBytes(io.RawIOBase):
    """A read-only file of ``size`` bytes that holds some of its ranges in memory; a read of any other range
    fetches it (``fetch``, one request)."""

    def __init__(self, size: int, fetch: Fetch) -> None:
        super().__init__()
        self._size, self._fetch, self._position = size, fetch, 0
        self._ranges: list[tuple[int, bytes]] = []  # (start, bytes)

    def holds(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` lies in one range held in memory."""
        return any(at <= start and end <= at + len(data) for at, data in self._ranges)

    def fetch(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Fetch the ``(start, end)`` ranges not held yet, in one call. Raises ``EOFError`` where the file
        ends before the size it was opened with."""
        wanted = [(start, min(end, self._size)) for start, end in ranges if not self.holds(start, end)]
        if not wanted:
            return
        found = self._fetch(
            [start for start, _ in wanted], [end for _, end in wanted]
        )  # fewer: the file ended
        for i, (start, end) in enumerate(wanted):
            data = found[i] if i < len(found) else b""
            if len(data) != end - start:
                raise EOFError(f"the file ends before byte {end} (its size was taken to be {self._size})")
            self._ranges.append((start, data))

    def _slice(self, start: int, end: int) -> bytes:
        if not self.holds(start, end):
            self.fetch([(start, end)])
        at, data = next((at, data) for at, data in self._ranges if at <= start and end <= at + len(data))
        return data[start - at : end - at]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def size(self) -> int:
        return self._size

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        end = min(self._position + len(buffer), self._size)
        data = self._slice(self._position, end) if end > self._position else b""
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


def column_ranges(metadata: pq.FileMetaData, columns: set[str]) -> list[tuple[int, int]]:
    """The byte ranges ``(start, end)`` of the chunks of ``columns`` (top-level names) in every row group,
    in file order, those less than :data:`GAP_BYTES` apart merged."""
    chunks = []
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if chunk.path_in_schema.split(".")[0] in columns:
                start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
                chunks.append((start, start + chunk.total_compressed_size))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(chunks):
        if merged and start - merged[-1][1] < GAP_BYTES:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def open_columns(root: Store, name: str, columns: set[str], size: int | None = None) -> pa.PythonFile:
    """The Parquet file ``name`` of ``root`` with its footer and the chunks of ``columns`` in memory: a
    request for its tail, one for the chunks (their ranges fetched concurrently), and one for its size
    first where ``size`` (in bytes) is not given."""

    def fetch(starts: list[int], ends: list[int]) -> list[bytes]:
        try:
            return root.read_ranges(name, starts, ends)
        except RangeNotSatisfiable:
            return []  # the file ends before the first range: KnownBytes says so

    file = KnownBytes(root.size(name) if size is None else size, fetch)
    file.fetch([(max(0, file.size() - TAIL_BYTES), file.size())])
    source = pa.PythonFile(file, mode="r")
    file.fetch(column_ranges(pq.ParquetFile(source).metadata, columns))
    return source
