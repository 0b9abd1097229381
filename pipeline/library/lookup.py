"""Rows by id for stage 2 of a search: where each embedded row of a version lies, kept in memory.

Built once per version from the few small columns a hit shows (``id``, ``uri``, ``segment``, ``start_s``,
``end_s``) and ``error``, held once (about 100 bytes a row, 100 MB at a million rows; the part tables kept for
the next version are the same memory), it finds a row by binary search over its ids (20 bytes a row), and
reads the row's re-rank record (:mod:`pipeline.library.features`) in O(its own bytes). Parts of
libraries older than format 3 keep their re-rank features inside the Parquet part: those are read there.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..storage import Store
from .features import FeatureFile, record_dtype, to_records
from .local_cache import LocalCache
from .manifest import PartInfo
from .reader import read_each, read_part
from .schema import PROMPT, dense_rows

HIT_COLUMNS = ["id", "uri", "segment", "start_s", "end_s"]
LOOKUP_COLUMNS = [*HIT_COLUMNS, "error"]  # what a lookup reads of each part


class PartTables:
    """The columns a lookup reads of each part file (or ``columns``), by path, kept for the next version's
    lookup: a part file never changes and a version shares most of its parts with the one before, so the
    lookup of the next version a reader opens (the service following a library) reads its new parts only.
    Holds the parts of the last version read; for one thread at a time. With ``cache``, a remote library's
    parts are read from their local copies where they have one (:mod:`~pipeline.library.local_cache`), and
    copied; a local library's are read from its files, as :class:`~pipeline.library.reader.Library` does."""

    def __init__(self, cache: LocalCache | None = None, columns: list[str] = LOOKUP_COLUMNS) -> None:
        self._tables: dict[str, pa.Table] = {}
        self.cache, self.columns = cache, columns

    def read(self, store: Store, parts: list[PartInfo], schema: pa.Schema) -> list[pa.Table]:
        """Each of ``parts``' tables, unmasked (row i at position i): those not held, read."""
        cache = None if store.is_local else self.cache
        held: dict[str, pa.Table | None] = {}
        for part in parts:
            table = self._tables.get(part.path)
            held[part.path] = self._copy(cache, store, part.path) if table is None else table
        missing = [part for part in parts if held[part.path] is None]
        read = read_each(store, missing, schema, self.columns, masked=False)
        for part, table in zip(missing, read, strict=True):
            held[part.path] = table
            if cache:
                cache.put(self._key(store, part.path), _ipc(table))
        self._tables = held
        return list(held.values())

    def read_together(
        self, store: Store, parts: list[PartInfo], schema: pa.Schema
    ) -> tuple[pa.Table, np.ndarray]:
        """The rows of ``parts`` (:meth:`read`) as one table in one piece of memory, each part's rows in
        order, and where each part's rows start in it (the total last). The parts are then held as slices
        of that table: the tables kept for the next version and the rows a lookup takes from are the same
        memory, and a take of rows from many parts is one take."""
        tables = self.read(store, parts, schema)
        together, starts = one_table(tables, schema.empty_table().select(self.columns))
        self._tables = {
            part.path: together.slice(start, end - start)
            for part, start, end in zip(parts, starts[:-1], starts[1:], strict=True)
        }
        return together, starts

    def _copy(self, cache: LocalCache | None, store: Store, path: str) -> pa.Table | None:
        """Part ``path``'s table from its local copy in ``cache`` (checked as it was written), or ``None``."""
        data = cache.get(self._key(store, path)) if cache else None
        return None if data is None else pa.ipc.open_stream(data).read_all()

    def _key(self, store: Store, path: str) -> str:
        """The local copy's key of the columns read of part ``path``."""
        return LocalCache.key(store, path, ",".join(self.columns))


def one_table(tables: list[pa.Table], empty: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """``tables`` (of one schema; ``empty`` where there are none) as one table in one piece of memory, and
    where each one's rows start in it (the total last). Its strings have 64-bit offsets: a column of over
    2 GiB (some 30M uris) is one piece too, which a take of rows needs."""
    wide = pa.schema(
        [f.with_type(pa.large_string()) if f.type == pa.string() else f for f in empty.schema],
        empty.schema.metadata,
    )
    together = pa.concat_tables([table.cast(wide) for table in tables] or [empty.cast(wide)])
    return together.combine_chunks(), np.cumsum([0, *(len(table) for table in tables)])


def held_rows(table: pa.Table, part: PartInfo) -> pa.ChunkedArray:
    """Which rows of ``table`` (of every row of ``part``, ``id`` among its columns) the version holds: those
    that the part's mask (its ``deleted`` ids) leaves."""
    return pc.invert(pc.is_in(table["id"], pa.array(part.deleted, pa.int64())))


def _ipc(table: pa.Table) -> bytes:
    """``table`` as an Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


class RowLookup:
    """The embedded rows of one version (``parts`` under ``store``, rows of ``schema``, re-rank features of
    ``prompt_shape``), by id; ``tables``: the part tables of the lookup before it (:class:`PartTables`)."""

    def __init__(
        self,
        store: Store,
        parts: list[PartInfo],
        schema: pa.Schema,
        prompt_shape: tuple[int, ...] | None,
        tables: PartTables | None = None,
    ) -> None:
        self.store, self.parts, self.schema, self.prompt_shape = store, parts, schema, prompt_shape
        # every row of the parts in one table, the same memory as the part tables kept for the next version
        together, self._starts = (tables or PartTables()).read_together(store, parts, schema)
        keep = pc.is_null(together["error"]).to_numpy(zero_copy_only=False)
        for part, start, end in zip(parts, self._starts[:-1], self._starts[1:], strict=True):
            if part.deleted:
                keep[start:end] &= held_rows(together.slice(start, end - start), part).to_numpy()
        kept = np.flatnonzero(keep)  # rows of the table
        order = np.argsort(together["id"].to_numpy()[kept], kind="stable")
        self._row = kept[order]  # by id: the row in the table
        self.ids = together["id"].to_numpy()[self._row]
        self.part_of = (np.searchsorted(self._starts, self._row, side="right") - 1).astype(np.int32)
        self._hits = together.select(HIT_COLUMNS)
        self._files: dict[str, FeatureFile] = {}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """The memory the lookup holds: its arrays by id and its table of the parts' rows (shared with the
        part tables kept for the next version)."""
        arrays = (self.ids, self.part_of, self._row, self._starts)
        return sum(array.nbytes for array in arrays) + self._hits.nbytes

    def ids_under(self, folder: str) -> np.ndarray:
        """The ids (sorted) of the embedded rows whose video is ``folder`` itself or lies under it (a
        folder's uri, ``s3://bucket/2024/``, with or without its last ``/``; or one video's)."""
        uris = self._hits["uri"]
        inside = pc.or_(pc.equal(uris, folder), pc.starts_with(uris, folder.rstrip("/") + "/"))
        return self.ids[inside.to_numpy(zero_copy_only=False)[self._row]]

    def ids_of_parts(self, paths: set[str]) -> dict[str, np.ndarray]:
        """The ids (sorted) of the embedded rows of each part of the version whose path is in ``paths``."""
        numbers = np.array([n for n, part in enumerate(self.parts) if part.path in paths], np.int32)
        if not numbers.size:
            return {}
        inside = np.flatnonzero(np.isin(self.part_of, numbers))
        grouped = inside[np.argsort(self.part_of[inside], kind="stable")]  # by part, each part's ids sorted
        bounds = np.searchsorted(self.part_of[grouped], numbers, side="right")
        ids = np.split(self.ids[grouped], bounds[:-1])
        return {self.parts[n].path: part_ids for n, part_ids in zip(numbers, ids, strict=True)}

    def rows(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Where the rows with ``ids`` are in :attr:`ids` and :attr:`part_of`, in the order of ``ids``.
        Raises ``KeyError`` for ids that are not embedded rows of the version."""
        wanted = np.asarray(ids, dtype=np.int64).reshape(-1)
        found = np.searchsorted(self.ids, wanted).clip(0, max(len(self.ids) - 1, 0))
        missing = wanted[(self.ids[found] != wanted)] if len(self.ids) else wanted
        if missing.size:
            raise KeyError(f"{self.store.uri} has no embedded rows with ids {missing[:20].tolist()}")
        return found

    def hits(self, ids: np.ndarray | list[int]) -> pa.Table:
        """The :data:`HIT_COLUMNS` of the rows with ``ids``, in that order."""
        return self._hits.take(self._row[self.rows(ids)])

    def records(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """The re-rank records (:func:`~pipeline.library.features.record_dtype`) of the rows with ``ids``, in
        that order: each part's rows in one read of their byte ranges."""
        rows = self.rows(ids)
        out = np.zeros(
            len(rows), record_dtype(self.schema.field("embedding").type.list_size, self.prompt_shape)
        )
        by_part: dict[int, list[int]] = defaultdict(list)
        for slot, row in enumerate(rows):
            by_part[int(self.part_of[row])].append(slot)
        for number, slots in by_part.items():
            part, positions = self.parts[number], self._row[rows[slots]] - self._starts[number]
            out[slots] = self._part_records(part, positions, self.ids[rows[slots]])
        return out

    def _part_records(self, part: PartInfo, positions: np.ndarray, ids: np.ndarray) -> np.ndarray:
        if part.features:
            file = self._files.setdefault(part.features, FeatureFile(self.store, part.features))
            return file.rows(positions)
        columns = ["id", "embedding", *([PROMPT] if self.prompt_shape else [])]  # a part older than format 3
        table = read_part(self.store, part, self.schema, columns, pc.field("id").isin(pa.array(ids)))
        table = table.take(pc.index_in(pa.array(ids), value_set=table["id"]))
        prompts = dense_rows(table[PROMPT], np.float16) if self.prompt_shape else None
        return to_records(dense_rows(table["embedding"], np.float32), prompts, self.prompt_shape)
