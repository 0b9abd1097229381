"""Re-rank records: what stage 2 of a search reads per candidate, stored so that a row costs its own bytes.

Each part file ``parts/part-<uuid>.parquet`` (format 3 on) has a sibling ``features/part-<uuid>.npy``: a
NumPy array of fixed-width records in the part's row order, one per row (error rows hold zeros), each the
row's ``embedding`` (float32, P) and, for a model family with re-rank features, its ``prompt`` (float16,
``prompt_shape``: X-CLIP's 49 x 512 for base-patch32, 50 KB). Row ``i`` lies at ``offset + i * itemsize``: a
local file is memory-mapped, a remote one read by byte ranges (adjacent rows in one request). In a Parquet
part the same row would cost its whole row group (1,024 rows: 50 MB at base-patch32), so the re-rank
features live only here; the embeddings stay in the part file too, for the index and for refresh.

Why ``.npy``: a documented, self-describing fixed-width layout that NumPy maps directly; random access by
position is all stage 2 needs (a table format built for random access, such as Lance, would add a large
dependency for the same reads).
"""

from __future__ import annotations

import io
import math
import zlib

import numpy as np

from ..storage import RangeNotSatisfiable, Store
from .manifest import parsing

FEATURES = "features"
HEADER_PROBE = 4096  # bytes read to parse a remote file's .npy header (NumPy pads it to a multiple of 64)


def record_dtype(embedding_dim: int, prompt_shape: tuple[int, ...] | None) -> np.dtype:
    """The dtype of one row's record: ``embedding`` float32 (P,) and, if any, ``prompt`` float16."""
    fields: list[tuple] = [("embedding", "<f4", (embedding_dim,))]
    if prompt_shape:
        fields.append(("prompt", "<f2", tuple(prompt_shape)))
    return np.dtype(fields)


def features_path(part_path: str) -> str:
    """``features/part-<uuid>.npy`` for ``parts/part-<uuid>.parquet``."""
    stem = part_path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return f"{FEATURES}/{stem}.npy"


def write_features(store: Store, path: str, records: np.ndarray) -> int:
    """Write ``records`` (a structured array of :func:`record_dtype`) as ``path`` under ``store``; returns
    the file's CRC-32 (searches read a few records of a file and do not check it; ``videosearch check``
    does)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(records), allow_pickle=False)
    data = buffer.getvalue()
    store.write_bytes(path, data)
    return zlib.crc32(data)


def to_records(
    embeddings: np.ndarray, prompts: np.ndarray | None, prompt_shape: tuple[int, ...] | None
) -> np.ndarray:
    """Records of :func:`record_dtype` from embeddings (R, P) and re-rank features (R, ...) or ``None``."""
    records = np.zeros(len(embeddings), record_dtype(embeddings.shape[1], prompt_shape))
    records["embedding"] = embeddings
    if prompt_shape:
        records["prompt"] = np.asarray(prompts).reshape(len(embeddings), *prompt_shape)
    return records


class FeatureFile:
    """One part's records, read by row position: memory-mapped locally, by byte ranges elsewhere."""

    def __init__(self, store: Store, path: str) -> None:
        self.store, self.path = store, path
        self._array: np.ndarray | None = None  # the memory map (local files)
        self._layout: tuple[np.dtype, int, int] | None = None  # dtype, rows, data offset (remote files)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The records at ``positions`` (row numbers in the part), in that order; a file that cannot be
        parsed (truncated) raises :class:`~pipeline.library.manifest.DamagedLibraryError`."""
        with parsing(self.store, self.path):
            return self._rows(np.asarray(positions, dtype=np.int64))

    def _rows(self, positions: np.ndarray) -> np.ndarray:
        if self.store.is_local:
            if self._array is None:
                with self.store.errors("reading", self.path):
                    self._array = np.load(self.store.path(self.path), mmap_mode="r")
            return np.array(self._array[positions])
        dtype, rows, offset = self._header()
        if positions.size and (positions.min() < 0 or positions.max() >= rows):
            raise IndexError(f"{self.store.url(self.path)} has {rows} rows, not row {positions.max()}")
        order = np.unique(positions)
        runs = np.split(order, np.flatnonzero(np.diff(order) != 1) + 1) if order.size else []  # adjacent rows
        starts = [offset + int(run[0]) * dtype.itemsize for run in runs]
        ends = [offset + (int(run[-1]) + 1) * dtype.itemsize for run in runs]
        try:
            data = b"".join(self.store.read_ranges(self.path, starts, ends))
        except RangeNotSatisfiable:
            data = b""  # the file ends before the first range
        if len(data) != sum(ends) - sum(starts):
            raise EOFError(f"the file ends before its row {order[-1]}")
        found = np.frombuffer(data, dtype=dtype)
        return found[np.searchsorted(order, positions)]

    def _header(self) -> tuple[np.dtype, int, int]:
        if self._layout is None:
            try:
                (head,) = self.store.read_ranges(self.path, [0], [HEADER_PROBE])  # fewer from a small file
            except RangeNotSatisfiable as e:
                raise EOFError("the file is empty") from e
            stream = io.BytesIO(head)
            version = np.lib.format.read_magic(stream)
            npy = np.lib.format
            read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, _, dtype = read_header(stream)
            self._layout = (dtype, math.prod(shape), stream.tell())
        return self._layout
