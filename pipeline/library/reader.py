"""Reading a library: one version's rows, its index and its model identity. Pure storage and data, no model.

See :mod:`pipeline.library.manifest` for the layout and the versioning rules.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from xclip_core.identity import ModelIdentity

from ..storage import StorageOptions, Store, as_store, each_at_once
from .features import FeatureFile
from .index import add, deserialize, remove
from .local_cache import LocalCache
from .manifest import (
    CURRENT,
    NotALibraryError,
    PartInfo,
    Version,
    current_version,
    list_versions,
    parsing,
    read_manifest,
)
from .ranged import open_many
from .schema import PROMPT, part_schema, stored_schema

READ_THREADS = 8  # part files read at once
PARTS_AT_ONCE = 256  # remote part files whose requests are sent together (their needed chunks in memory)
# part files are written with a CRC of each page (LibraryWriter.write_part): a page whose bytes changed since
# (bit rot, an overwrite) is a damaged file, not wrong rows; parts written before checksums read unchecked.
# Read without pre-buffering and decoded in the reading thread (read_part): Arrow's own threads reading a
# Python file can drop the last reference to its buffers after the read returned, and a process exiting then
# aborts ("terminate called without an active exception", exit 134). On remote storage the ranges a read
# needs are fetched together beforehand instead (.ranged).
CHECKED_PARQUET = ds.ParquetFileFormat(
    default_fragment_scan_options=ds.ParquetFragmentScanOptions(
        page_checksum_verification=True, pre_buffer=False
    )
)


def read_part(
    root: Store,
    part: PartInfo,
    schema: pa.Schema,
    columns: list[str] | None = None,
    filter: pc.Expression | None = None,
    masked: bool = True,
    source: bytes | pa.NativeFile | None = None,
) -> pa.Table:
    """The rows of one part file: only ``columns`` and the rows matching ``filter`` if given, its ``deleted``
    ids left out unless ``masked`` is False. Only the column chunks asked for are read (ranged reads: on
    remote storage one request for its footer and one for the chunks, see :mod:`.ranged`), or parsed from
    ``source``, the file's bytes or the file opened, where a caller has them; re-rank features come from the
    part's records file where it has one. A storage failure raises ``StorageError`` naming the file, never
    "no such file"."""
    asked = _Read(part, schema, columns, filter, masked)
    with (
        root.errors("reading", part.path),
        parsing(root, part.path),
        _opened(root, part, asked.fetched, source) as f,
    ):
        fragment = CHECKED_PARQUET.make_fragment(f)
        # in this thread (see CHECKED_PARQUET); parts are read several at once by read_each instead
        table = fragment.to_table(
            schema=asked.physical, columns=asked.read, filter=asked.condition, use_threads=False
        )
        everyone = (
            fragment.to_table(schema=asked.physical, columns=["id"], use_threads=False)["id"]
            if asked.beside
            else None
        )
    if not asked.beside:
        return table
    positions = pc.index_in(table["id"], value_set=everyone).to_numpy()
    prompts = FeatureFile(root, part.features).rows(positions)["prompt"]
    prompt = pa.FixedSizeListArray.from_arrays(
        pa.array(prompts.reshape(-1)), schema.field(PROMPT).type.list_size
    )
    return pa.table(
        {n: prompt if n == PROMPT else table[n] for n in asked.names},
        schema=pa.schema([schema.field(n) for n in asked.names]),
    )


class _Read:
    """What one read of ``part`` asks of its file: the columns it returns (``names``), those read from the
    file (``read``: re-rank features live beside it since format 3), the row ``condition`` (``filter`` and
    the part's mask), the file's ``physical`` schema, and the columns whose chunks are ``fetched`` up front
    on remote storage (a filter may name any column: with one, the narrow ones, all but the vectors)."""

    def __init__(
        self,
        part: PartInfo,
        schema: pa.Schema,
        columns: list[str] | None,
        filter: pc.Expression | None,
        masked: bool,
    ) -> None:
        self.names = schema.names if columns is None else list(columns)
        self.condition = filter
        if masked and part.deleted:
            visible = ~pc.field("id").isin(pa.array(part.deleted, pa.int64()))
            self.condition = visible if filter is None else filter & visible
        self.beside = part.features is not None and PROMPT in self.names
        self.read = [n for n in self.names if n != PROMPT or not self.beside]
        if self.beside and "id" not in self.names:
            self.read.append("id")
        self.physical = stored_schema(schema) if part.features else schema
        narrow = {field.name for field in self.physical if not pa.types.is_fixed_size_list(field.type)}
        self.fetched = set(self.read) | (narrow if self.condition is not None else set())


@contextlib.contextmanager
def _opened(
    root: Store, part: PartInfo, columns: set[str], source: bytes | pa.NativeFile | None
) -> Iterator[pa.NativeFile]:
    """The file of ``part`` for one read: ``source`` where given (its bytes, or the file opened), else the
    local file, else the remote file with its footer and the chunks of ``columns`` fetched."""
    if isinstance(source, pa.NativeFile):
        yield source
    elif source is not None:
        yield pa.BufferReader(source)
    elif root.is_local:
        with root.open(part.path, "rb") as f:
            yield pa.PythonFile(f, mode="r")
    else:
        yield open_many(root, [(part.path, part.file_bytes, columns)])[0]


def read_each(
    root: Store,
    parts: list[PartInfo],
    schema: pa.Schema,
    columns: list[str] | None = None,
    filter: pc.Expression | None = None,
    masked: bool = True,
) -> list[pa.Table]:
    """:func:`read_part` of each of ``parts`` (:data:`READ_THREADS` at once), in their order. On remote
    storage the requests of :data:`PARTS_AT_ONCE` parts are sent together (:func:`~.ranged.open_many`): a
    round trip for their footers, one for their chunks, instead of two per part."""

    def read(part: PartInfo, source: pa.NativeFile | None = None) -> pa.Table:
        return read_part(root, part, schema, columns, filter, masked, source)

    if root.is_local:
        return each_at_once(read, parts, READ_THREADS)
    tables = []
    for start in range(0, len(parts), PARTS_AT_ONCE):
        group = parts[start : start + PARTS_AT_ONCE]
        asked = [(p.path, p.file_bytes, _Read(p, schema, columns, filter, masked).fetched) for p in group]
        files = open_many(root, asked)
        tables += each_at_once(lambda pair: read(*pair), list(zip(group, files, strict=True)), READ_THREADS)
    return tables


def read_parts(
    root: Store,
    parts: list[PartInfo],
    schema: pa.Schema,
    columns: list[str] | None = None,
    filter: pc.Expression | None = None,
) -> pa.Table:
    """The rows of ``parts`` that a version holds (:func:`read_each`), part after part, as one table."""
    tables = read_each(root, parts, schema, columns, filter)
    return pa.concat_tables(tables) if tables else schema.empty_table().select(columns or schema.names)


def embedded_rows(root: Store, parts: list[PartInfo], schema: pa.Schema) -> tuple[np.ndarray, np.ndarray]:
    """The ids (N,) and float32 embeddings (N, D) of the rows of ``parts`` that have an embedding."""
    table = read_parts(root, parts, schema, ["id", "embedding"], pc.field("error").is_null())
    dim = schema.field("embedding").type.list_size
    vectors = table["embedding"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, dim)
    return table["id"].to_numpy(), vectors


def read_index_file(root: Store, entry: dict[str, Any], cache: LocalCache | None = None) -> faiss.Index:
    """The index file of a manifest's index ``entry``, as written (a delta's base; the delta not applied);
    its bytes checked against the CRC-32 the entry records (versions written before it: unchecked). With
    ``cache``, its local copy where it has a sound one, else the file, then copied."""
    key = LocalCache.key(root, entry["path"])
    kept = cache.get(key) if cache else None  # checked as it was written
    if kept is not None:
        return deserialize(kept)
    with parsing(root, entry["path"], f"`videosearch reindex {root.uri}` builds it again"):
        data = root.read_large(entry["path"])
        crc = zlib.crc32(data) if "crc32" in entry else None
        if crc != entry.get("crc32"):
            raise ValueError(f"its CRC-32 is {crc}, the manifest recorded {entry['crc32']}")
        index = deserialize(data)
    if cache:
        cache.put(key, data)
    return index


class Library:
    """One version of a library, for reading.

    Open with :meth:`open`; ``Library(location, version, options)`` wraps a :class:`Version` already at hand.
    ``location`` is a URI (with ``options``) or a :class:`~pipeline.storage.Store`.
    """

    def __init__(
        self,
        location: str | Store,
        version: Version,
        options: StorageOptions | None = None,
        cache: LocalCache | None = None,
    ) -> None:
        self.store = as_store(location, options)
        self.snapshot = version
        # local copies of what is read of a remote library (see local_cache): its index file, row lookups
        self.cache = None if self.store.is_local else cache
        self._index: faiss.Index | None = None

    @classmethod
    def open(
        cls,
        location: str | Store,
        options: StorageOptions | None = None,
        version: int | None = None,
        cache: LocalCache | None = None,
    ) -> Library:
        """The current version of the library at ``location``, or version ``version``; ``cache``: where to
        keep local copies of what is read of it (:mod:`~pipeline.library.local_cache`).

        Raises :class:`NotALibraryError` when it holds no library, :class:`VersionNotFoundError` (listing the
        available versions) when it has no version ``version``, and ``StorageError`` when storage fails.
        """
        store = as_store(location, options)
        if version is not None:
            return cls(store, Version(version, read_manifest(store, version)), cache=cache)
        current = current_version(store)
        if current is None:
            raise NotALibraryError(
                f"{store.uri} is not a videosearch library (it has no {CURRENT}); "
                f"create one with `videosearch embed <videos> {store.uri}`"
            )
        return cls(store, current, cache=cache)

    @staticmethod
    def current_version(location: str | Store, options: StorageOptions | None = None) -> Version | None:
        """The published version of the library at ``location`` (a writer's base); ``None`` if none."""
        return current_version(as_store(location, options))

    @property
    def uri(self) -> str:
        return self.store.uri

    @property
    def options(self) -> StorageOptions:
        return self.store.options

    @property
    def version(self) -> int:
        """The version number."""
        return self.snapshot.number

    @property
    def manifest(self) -> dict[str, Any]:
        """The version's manifest (see :meth:`LibraryWriter.prepare`)."""
        return self.snapshot.manifest

    @property
    def model(self) -> ModelIdentity:
        """The model that made the embeddings."""
        return self.snapshot.model

    @property
    def rerank_shape(self) -> tuple[int, int] | None:
        """The shape of one row's re-rank features; ``None`` when the model family has none."""
        return self.snapshot.rerank_shape

    @property
    def schema(self) -> pa.Schema:
        """The schema of the version's rows."""
        return part_schema(self.manifest["embedding_dim"], self.rerank_shape)

    def table(self, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        """All rows of the version, part after part; only ``columns`` (e.g. all but ``prompt_features`` for a
        listing) and the rows matching ``filter`` if given."""
        return read_parts(self.store, self.snapshot.parts, self.schema, columns, filter)

    def rows_by_id(self, ids: np.ndarray | list[int], columns: list[str] | None = None) -> pa.Table:
        """The rows with ``ids``, in that order (repeated ids give repeated rows); only ``columns`` if given.

        Reads only the requested columns, and filters by id as it reads. Raises ``KeyError`` for ids that
        the version does not have (such as the -1 of a search with fewer results than asked).
        """
        wanted = pa.array(np.asarray(ids, dtype=np.int64).reshape(-1))
        names = self.schema.names if columns is None else list(columns)
        found = self.table(names if "id" in names else [*names, "id"], pc.field("id").isin(wanted))
        positions = pc.index_in(wanted, value_set=found["id"])
        if positions.null_count:
            missing = pc.filter(wanted, pc.is_null(positions)).to_pylist()
            raise KeyError(f"{self.uri} version {self.version} has no rows with ids {missing[:20]}")
        return found.take(positions).select(names)

    def index(self) -> faiss.Index:
        """The version's FAISS index (read once, then cached, shared: change a :meth:`read_index` copy)."""
        if self._index is None:
            self._index = self.read_index()
        return self._index

    def read_index(self) -> faiss.Index:
        """A fresh copy of the version's index: its index file, with the manifest's delta applied (the ids it
        removes out, the embedded rows of the parts it adds in)."""
        entry = self.manifest["index"]
        index = read_index_file(self.store, entry, self.cache)
        if entry.get("removed"):
            index = remove(index, np.array(entry["removed"], np.int64))
        added = [part for part in self.snapshot.parts if part.path in set(entry.get("added", ()))]
        if added:
            add(index, *embedded_rows(self.store, added, self.schema))
        return index

    def versions(self) -> list[int]:
        """All version numbers of the library (see :func:`~pipeline.library.manifest.list_versions`)."""
        return list_versions(self.store)
