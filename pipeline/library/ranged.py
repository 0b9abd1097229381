"""Parquet files on remote storage read in few requests: their tails (the footers) first, then the byte ranges
of the column chunks a read needs, near ones fetched as one range; the requests of many files sent together.

Arrow does this itself when it pre-buffers, on its own IO threads; a Python file must not be read there
(:data:`pipeline.library.reader.CHECKED_PARQUET`), so the ranges are fetched here and Arrow reads them from
memory in the calling thread. Whatever else it asks for (a footer longer than the tail, a column not
planned) is fetched when asked: a plan that missed costs a request, never a wrong byte. A file whose
requests failed raises the failure at its first read, where its reader names the file.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..storage import RangeNotSatisfiable, StorageError, Store, each_at_once

TAIL_BYTES = 64 * 1024  # the first read: Arrow's own first read of a footer
GAP_BYTES = 64 * 1024  # column chunks nearer to each other than this are fetched as one range
SIZE_REQUESTS = 16  # sizes asked at once, for files whose size was not recorded

Fetch = Callable[[list[int], list[int]], list[bytes]]  # (starts, ends) -> the bytes of each range


class KnownBytes(io.RawIOBase):
    """A read-only file of ``size`` bytes that holds some of its ranges in memory; a read of any other range
    fetches it (``fetch``, one request). Once :meth:`fail` has recorded an error, every read raises it."""

    def __init__(self, size: int, fetch: Fetch) -> None:
        super().__init__()
        self._size, self._fetch, self._position = size, fetch, 0
        self._ranges: list[tuple[int, bytes]] = []  # (start, bytes)
        self.failure: BaseException | None = None

    def holds(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` lies in one range held in memory."""
        return any(at <= start and end <= at + len(data) for at, data in self._ranges)

    def wanted(self, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Of the ``(start, end)`` ranges, those not held (cut at the file's end)."""
        return [(start, min(end, self._size)) for start, end in ranges if not self.holds(start, end)]

    def hold(self, start: int, end: int, data: bytes) -> None:
        """Hold ``data``, the bytes ``[start, end)`` fetched; ``EOFError`` where the file ended before."""
        if len(data) != end - start:
            raise EOFError(f"the file ends before byte {end} (its size was taken to be {self._size})")
        self._ranges.append((start, data))

    def fail(self, error: BaseException) -> None:
        """Raise ``error`` at every read from now on (a request for this file failed)."""
        self.failure = error

    def fetch(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Fetch the ranges not held yet, in one call."""
        wanted = self.wanted(ranges)
        if wanted:
            found = self._fetch([start for start, _ in wanted], [end for _, end in wanted])  # fewer: it ended
            for i, (start, end) in enumerate(wanted):
                self.hold(start, end, found[i] if i < len(found) else b"")

    def _slice(self, start: int, end: int) -> bytes:
        if self.failure is not None:
            raise self.failure
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


def _fetch_together(root: Store, files: list[KnownBytes], names: list[str], ranges: list[list]) -> None:
    """Fetch, for each file (``names[i]`` of ``root``), its ``ranges[i]`` not held yet, all in one call
    (concurrent requests); a file whose request failed keeps the failure for its next read."""
    wanted = [
        (i, start, end)
        for i, file in enumerate(files)
        if file.failure is None
        for start, end in file.wanted(ranges[i])
    ]
    found = root.read_ranges_of(
        [names[i] for i, _, _ in wanted], [s for _, s, _ in wanted], [e for *_, e in wanted]
    )
    for (i, start, end), data in zip(wanted, found, strict=True):
        if isinstance(data, RangeNotSatisfiable):  # the file ends before the range starts
            data = b""
        if isinstance(data, BaseException):
            files[i].fail(data)  # raised again at the file's first read, which names it
            continue
        try:
            files[i].hold(start, end, data)
        except EOFError as e:
            files[i].fail(e)


def open_many(root: Store, files: Sequence[tuple[str, int | None, set[str]]]) -> list[pa.PythonFile]:
    """Each ``(name, size, columns)`` Parquet file of ``root`` with its footer and the chunks of ``columns``
    in memory, the requests of all the files sent together: a request per file for its size where ``size``
    (bytes) is None, then one for each tail, then one for each file's chunks."""

    def size_or_failure(name: str) -> int | BaseException:
        try:
            return root.size(name)
        except StorageError as e:
            return e

    names = [name for name, _, _ in files]
    unknown = [name for name, size, _ in files if size is None]
    asked = dict(zip(unknown, each_at_once(size_or_failure, unknown, SIZE_REQUESTS), strict=True))
    opened = []
    for name, size, _ in files:
        size = asked[name] if size is None else size
        file = KnownBytes(0 if isinstance(size, BaseException) else size, _fetcher(root, name))
        if isinstance(size, BaseException):
            file.fail(size)
        opened.append(file)
    _fetch_together(root, opened, names, [[(max(0, f.size() - TAIL_BYTES), f.size())] for f in opened])
    plans: list[list[tuple[int, int]]] = []
    for file, (_, _, columns) in zip(opened, files, strict=True):
        try:
            footer = pq.ParquetFile(pa.PythonFile(file, mode="r")).metadata if file.failure is None else None
        except Exception as e:  # noqa: BLE001 - raised again at the file's first read, which names it
            file.fail(e)
            footer = None
        plans.append(column_ranges(footer, columns) if footer is not None else [])
    _fetch_together(root, opened, names, plans)
    return [pa.PythonFile(file, mode="r") for file in opened]


def _fetcher(root: Store, name: str) -> Fetch:
    def fetch(starts: list[int], ends: list[int]) -> list[bytes]:
        try:
            return root.read_ranges(name, starts, ends)
        except RangeNotSatisfiable:
            return []  # the file ends before the first range: KnownBytes says so

    return fetch
