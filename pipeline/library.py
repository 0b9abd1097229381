"""A library: the versioned store of a collection's embedded rows and their search index.

Layout under the library URI (a local path, ``s3://bucket/prefix``, any fsspec URL)::

    parts/part-<uuid>.parquet   rows with the schema pipeline.schema.part_schema(...)
    index/<uuid>.faiss          the FAISS index of one version (row ids -> embeddings)
    versions/<n>.json           the manifest of version n (see LibraryWriter.prepare)
    _current                    "n": the published version, the only object ever replaced

Everything but ``_current`` is immutable once written, and versions are numbered from 1. A reader reads
``_current`` once, then only immutable files: writers never disturb it, and any published version stays
readable by number (``Library.open(uri, version=n)``).

Publishing (:meth:`LibraryWriter.publish`) writes the parts, then the index, then the manifest (created only
if ``versions/<n>.json`` does not exist yet), then replaces ``_current`` with a compare-and-swap against the
``_current`` the writer started from. That last write is the commit: a writer that stops before it leaves the
previous version current, and of two writers that started from the same version exactly one publishes; the
other gets :class:`ConcurrentWriteError`. A manifest whose writer crashed or lost never becomes current, but
its number stays taken (and listed by :func:`list_versions`); the next writer takes the next free number.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import cached_property
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.index import deserialize, kind_of, serialize
from pipeline.schema import part_schema
from pipeline.storage import (
    ObjectNotFound,
    PreconditionFailed,
    StorageOptions,
    current_token,
    filesystem,
    is_local,
    join,
    put_if,
    read_bytes,
    read_with_token,
    storage_errors,
    write_bytes,
)

if TYPE_CHECKING:
    from pipeline.search import Hit, Searcher

FORMAT = 1  # manifest format; readers refuse newer ones
CURRENT = "_current"
ROW_GROUP_ROWS = 1024  # rows per Parquet row group: the unit rows_by_id can skip by id statistics


class LibraryError(Exception):
    """A library is missing, damaged, or could not be updated."""


class NotALibraryError(LibraryError):
    """There is no library at the URI (no ``_current``)."""


class VersionNotFoundError(LibraryError):
    """The library has no such version."""


class ConcurrentWriteError(LibraryError):
    """Another writer published a version after this writer's base version: re-run on the new one."""


@dataclass(frozen=True)
class PartInfo:
    """A part file: its path relative to the library root, its rows, and how many of them are ok / errors."""

    path: str
    rows: int
    ok: int
    errors: int


@dataclass(frozen=True)
class Version:
    """One version of a library: its number and manifest.

    ``token`` is the version token of the ``_current`` that named it, as read: what a writer starting from
    this version compares against. ``None`` for a version opened by number (it cannot be a base then).
    """

    number: int
    manifest: dict[str, Any]
    token: str | None = None

    @property
    def parts(self) -> list[PartInfo]:
        """The version's part files."""
        return [PartInfo(**part) for part in self.manifest["parts"]]


def _manifest_path(number: int) -> str:
    return f"versions/{number}.json"


def list_versions(uri: str, options: StorageOptions | None = None) -> list[int]:
    """The numbers of all manifests in the library, ascending (``[]`` if none).

    This includes the manifests of writers that crashed or lost a race before publishing: complete but
    never current. ``_current`` says which version is published.
    """
    fs, path = filesystem(uri, options)
    directory = join(path, "versions")
    with storage_errors(join(uri, "versions"), "listing", options):
        fs.invalidate_cache(directory)
        try:
            names = fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
    stems = (name.rsplit("/", 1)[-1].removesuffix(".json") for name in names if name.endswith(".json"))
    return sorted(int(stem) for stem in stems if stem.isdigit())


def parts_dataset(
    uri: str, options: StorageOptions | None, parts: list[PartInfo], schema: pa.Schema
) -> ds.Dataset:
    """The part files of a library as one Arrow dataset (read only the columns you need)."""
    fs, path = filesystem(uri, options)
    return ds.dataset([join(path, p.path) for p in parts], schema=schema, format="parquet", filesystem=fs)


class Library:
    """One version of a library, for reading. Pure storage and data: no model.

    Open with :meth:`open`; ``Library(uri, version, options)`` wraps a :class:`Version` already at hand.
    """

    def __init__(self, uri: str, version: Version, options: StorageOptions | None = None) -> None:
        self.uri = uri
        self.options = options
        self.snapshot = version
        self._index: faiss.Index | None = None
        self._searcher: Searcher | None = None

    @classmethod
    def open(cls, uri: str, options: StorageOptions | None = None, version: int | None = None) -> Library:
        """The current version of the library at ``uri``, or version ``version``.

        Raises :class:`NotALibraryError` when ``uri`` holds no library, :class:`VersionNotFoundError` (listing
        the available versions) when it has no version ``version``, and ``StorageError`` when storage fails.
        """
        if version is not None:
            return cls(uri, Version(version, _read_manifest(uri, version, options)), options)
        current = cls.current_version(uri, options)
        if current is None:
            raise NotALibraryError(
                f"{uri} is not a videosearch library (it has no {CURRENT}); "
                f"create one with `videosearch embed <videos> {uri}`"
            )
        return cls(uri, current, options)

    @staticmethod
    def current_version(uri: str, options: StorageOptions | None = None) -> Version | None:
        """The published version of the library at ``uri`` (a writer's base); ``None`` if there is none."""
        try:
            data, token = read_with_token(join(uri, CURRENT), options)
        except ObjectNotFound:
            return None
        number = int(data)
        return Version(number, _read_manifest(uri, number, options, named_by_current=True), token)

    @property
    def version(self) -> int:
        """The version number."""
        return self.snapshot.number

    @property
    def manifest(self) -> dict[str, Any]:
        """The version's manifest (see :meth:`LibraryWriter.prepare`)."""
        return self.snapshot.manifest

    @property
    def model(self) -> dict[str, Any]:
        """The model that made the embeddings: ``{"id": <source>, "sha256": <weights hash>, ...}``."""
        return self.manifest["model"]

    @property
    def schema(self) -> pa.Schema:
        """The schema of the version's rows."""
        return part_schema(self.manifest["embedding_dim"], tuple(self.manifest["prompt_shape"]))

    @cached_property
    def _dataset(self) -> ds.Dataset:
        return parts_dataset(self.uri, self.options, self.snapshot.parts, self.schema)

    def table(self, columns: list[str] | None = None) -> pa.Table:
        """All rows of the version, part after part; only ``columns`` if given (e.g. all but
        ``prompt_features`` for a listing)."""
        return self._dataset.to_table(columns=columns)

    def rows_by_id(self, ids: np.ndarray | list[int], columns: list[str] | None = None) -> pa.Table:
        """The rows with ``ids``, in that order (repeated ids give repeated rows); only ``columns`` if given.

        Reads only the requested columns, and filters by id as it reads. Raises ``KeyError`` for ids that
        the version does not have (such as the -1 of a search with fewer results than asked).
        """
        wanted = pa.array(np.asarray(ids, dtype=np.int64).reshape(-1))
        names = self.schema.names if columns is None else list(columns)
        found = self._dataset.to_table(
            columns=names if "id" in names else [*names, "id"], filter=pc.field("id").isin(wanted)
        )
        positions = pc.index_in(wanted, value_set=found["id"])
        if positions.null_count:
            missing = pc.filter(wanted, pc.is_null(positions)).to_pylist()
            raise KeyError(f"{self.uri} version {self.version} has no rows with ids {missing[:20]}")
        return found.take(positions).select(names)

    def index(self) -> faiss.Index:
        """The version's FAISS index (read once, then cached). Shared: to update it, deserialize a copy."""
        if self._index is None:
            path = join(self.uri, self.manifest["index"]["path"])
            self._index = deserialize(read_bytes(path, self.options))
        return self._index

    def versions(self) -> list[int]:
        """All version numbers of the library (see :func:`list_versions`)."""
        return list_versions(self.uri, self.options)

    def search(self, text: str, k: int = 10) -> list[Hit]:
        """The ``k`` best videos (or segments) for ``text``, best first (see :mod:`pipeline.search`).
        The library's own model is loaded on the first call."""
        from .search import Searcher  # the model (torch) is needed only to search

        if self._searcher is None:
            self._searcher = Searcher(self)
        return self._searcher.search(text, k)


def _read_manifest(
    uri: str, number: int, options: StorageOptions | None, named_by_current: bool = False
) -> dict[str, Any]:
    try:
        manifest = json.loads(read_bytes(join(uri, _manifest_path(number)), options))
    except ObjectNotFound:
        if named_by_current:
            message = f"{uri} is damaged: {CURRENT} names version {number}, which has no manifest"
            raise LibraryError(message) from None
        available = list_versions(uri, options)
        if not available:
            raise NotALibraryError(
                f"{uri} is not a videosearch library (it has no versions); "
                f"create one with `videosearch embed <videos> {uri}`"
            ) from None
        raise VersionNotFoundError(
            f"{uri} has no version {number}; available versions: {', '.join(map(str, available))}"
        ) from None
    if manifest.get("format", 0) > FORMAT:
        raise LibraryError(
            f"{uri} version {number} has manifest format {manifest['format']}, this program reads up to "
            f"{FORMAT}: upgrade videosearch"
        )
    return manifest


class LibraryWriter:
    """Writes part files and publishes versions of the library at ``uri``.

    ``embedding_dim`` and ``prompt_shape`` (patches, width) fix the part schema (``part_schema``) that every
    part must have. Typical use::

        base = Library.current_version(uri)         # None for a new library
        parts = base.parts + [writer.write_part(table) for table in tables]
        version = writer.publish(parts, index, model, base)
    """

    def __init__(
        self,
        uri: str,
        options: StorageOptions | None = None,
        *,
        embedding_dim: int,
        prompt_shape: tuple[int, int],
    ) -> None:
        self.uri = uri
        self.options = options
        self.embedding_dim = embedding_dim
        self.prompt_shape = tuple(prompt_shape)
        self.schema = part_schema(embedding_dim, self.prompt_shape)
        self.writer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def write_part(self, table: pa.Table) -> PartInfo:
        """Write ``table`` as a new part file; it is no part of any version until a version lists it.

        The table must have exactly the part schema's columns (in any order); column types are cast to the
        schema's (e.g. variable-size lists of the right length to fixed-size ones). Raises ``ValueError``
        when columns are missing, extra or cannot be cast, or when an id is null.
        """
        names, expected = set(table.column_names), set(self.schema.names)
        if names != expected or len(names) != table.num_columns:
            raise ValueError(
                f"part columns must be exactly {self.schema.names}; missing {sorted(expected - names)}, "
                f"unexpected or repeated {sorted(names - expected) or table.column_names}"
            )
        columns = []
        for field in self.schema:
            try:
                columns.append(table[field.name].cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ValueError(f"part column {field.name!r} cannot be cast to {field.type}: {e}") from e
        table = pa.Table.from_arrays(columns, schema=self.schema)
        if table["id"].null_count:
            raise ValueError("every part row needs an id")
        path = f"parts/part-{uuid.uuid4().hex}.parquet"
        fs, full = filesystem(join(self.uri, path), self.options)
        with storage_errors(join(self.uri, path), "writing", self.options):
            if is_local(fs):
                fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(full, "wb") as f:
                pq.write_table(table, f, row_group_size=ROW_GROUP_ROWS)
        errors = table.num_rows - table["error"].null_count
        return PartInfo(path, table.num_rows, table.num_rows - errors, errors)

    def publish(
        self,
        parts: list[PartInfo],
        index: faiss.Index,
        model: dict[str, Any],
        base: Version | None,
        extra: dict[str, Any] | None = None,
    ) -> Version:
        """Publish a version made of ``parts`` (all of its rows: keep the base's parts that stay) and
        ``index`` (the embeddings of their ok rows, under their ids), on top of ``base`` (``None`` for the
        first version). Returns the new version, which can be the base of the next publish.

        Raises :class:`ConcurrentWriteError` if another writer published after ``base``; what this call wrote
        then never becomes current. The steps are :meth:`prepare`, :meth:`claim` and :meth:`set_current`.
        """
        manifest = self.prepare(parts, index, model, base, extra)
        return self.set_current(self.claim(manifest, base), base)

    def prepare(
        self,
        parts: list[PartInfo],
        index: faiss.Index,
        model: dict[str, Any],
        base: Version | None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Check the parts and the index, write the index file, and return the new version's manifest
        (its ``"version"`` still ``None``). An example manifest::

            {"format": 1, "version": 2, "parent": 1, "created": "2025-05-01T12:00:00+00:00",
             "writer": "host:4242:1a2b3c4d", "model": {"id": "microsoft/xclip-base-patch32", "sha256": "..."},
             "embedding_dim": 512, "prompt_shape": [50, 768],
             "index": {"path": "index/<uuid>.faiss", "kind": "flat", "ntotal": 9},
             "parts": [{"path": "parts/part-<uuid>.parquet", "rows": 10, "ok": 9, "errors": 1}],
             "counts": {"videos": 4, "segments": 9, "ok": 3, "failed": 1}, "next_id": 10, "extra": {}}

        ``counts``: distinct videos (``uri``), rows with an embedding, videos without / with an error row.
        ``next_id``: the smallest id that no version up to this one has used.
        """
        if base is not None and base.token is None:
            raise ValueError(
                f"version {base.number} was opened by number: publish on top of the current version instead"
            )
        if "id" not in model:
            raise ValueError("model must have an 'id' (where the weights came from)")
        if index.d != self.embedding_dim:
            raise ValueError(f"the index has dimension {index.d}, the parts' embeddings {self.embedding_dim}")
        dataset = parts_dataset(self.uri, self.options, parts, self.schema)
        rows = dataset.to_table(columns=["id", "uri", "error"])
        segments = rows["error"].null_count  # rows without an error have an embedding
        if index.ntotal != segments:
            raise ValueError(f"the index holds {index.ntotal} vectors, the parts have {segments} embeddings")
        videos = pc.count_distinct(rows["uri"]).as_py()
        failed = pc.count_distinct(pc.filter(rows["uri"], pc.is_valid(rows["error"]))).as_py()
        max_id = pc.max(rows["id"]).as_py()
        next_id = max(base.manifest["next_id"] if base else 0, 0 if max_id is None else max_id + 1)

        index_path = f"index/{uuid.uuid4().hex}.faiss"
        write_bytes(join(self.uri, index_path), serialize(index), self.options)
        return {
            "format": FORMAT,
            "version": None,
            "parent": base.number if base else None,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "writer": self.writer_id,
            "model": model,
            "embedding_dim": self.embedding_dim,
            "prompt_shape": list(self.prompt_shape),
            "index": {"path": index_path, "kind": kind_of(index), "ntotal": index.ntotal},
            "parts": [asdict(part) for part in parts],
            "counts": {"videos": videos, "segments": segments, "ok": videos - failed, "failed": failed},
            "next_id": next_id,
            "extra": extra or {},
        }

    def claim(self, manifest: dict[str, Any], base: Version | None) -> Version:
        """Write ``manifest`` as ``versions/<n>.json`` for the first free n after ``base``; not published yet.

        A number whose manifest exists is skipped while ``_current`` still names ``base`` (its writer crashed,
        or is publishing too: ``_current`` decides between us); once ``_current`` has moved, we lost.
        """
        number = (base.number if base else 0) + 1
        while True:
            claimed = {**manifest, "version": number}
            try:
                put_if(
                    join(self.uri, _manifest_path(number)),
                    json.dumps(claimed, indent=1).encode(),
                    None,
                    self.options,
                )
                return Version(number, claimed)
            except PreconditionFailed:
                if current_token(join(self.uri, CURRENT), self.options) != (base.token if base else None):
                    raise self._lost(base) from None
                number += 1

    def set_current(self, version: Version, base: Version | None) -> Version:
        """Publish ``version`` (from :meth:`claim`): replace ``_current`` if it still names ``base``.

        If it does not, but names ``version`` already (a retried request that had succeeded), that is
        success too; otherwise raises :class:`ConcurrentWriteError`.
        """
        current = join(self.uri, CURRENT)
        try:
            token = put_if(current, str(version.number).encode(), base.token if base else None, self.options)
        except PreconditionFailed:
            data, token = read_with_token(current, self.options)
            if int(data) != version.number:
                raise self._lost(base) from None
        return Version(version.number, version.manifest, token)

    def _lost(self, base: Version | None) -> ConcurrentWriteError:
        published = int(read_bytes(join(self.uri, CURRENT), self.options))
        since = f"version {base.number}" if base else "the start"
        return ConcurrentWriteError(
            f"another writer published version {published} of {self.uri} meanwhile (this one started from "
            f"{since}); re-run"
        )
