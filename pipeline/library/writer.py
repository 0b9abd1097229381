"""Writing a library: part files, then a version published by compare-and-swap.

Publishing (:meth:`LibraryWriter.publish`) writes the parts, then the index, then the manifest (created only
if ``versions/<n>.json`` does not exist yet), then replaces ``_current`` with a compare-and-swap against the
``_current`` the writer started from. That last write is the commit: a writer that stops before it leaves the
previous version current, and of two writers that started from the same version exactly one publishes; the
other gets :class:`ConcurrentWriteError`. A manifest whose writer crashed or lost never becomes current, but
its number stays taken (and listed by ``list_versions``); the next writer takes the next free number.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xclip_core.identity import ModelIdentity

from ..storage import PreconditionFailed, StorageOptions, Store, as_store
from .features import features_path, to_records, write_features
from .index import kind_of, serialize
from .manifest import CURRENT, FORMAT, ConcurrentWriteError, PartInfo, Version, manifest_name
from .reader import read_parts
from .schema import PROMPT, dense_rows, part_schema

PART_ROWS = 256  # rows per part file: what a job writes at most, and what refresh merges small parts into
ROW_GROUP_ROWS = 1024  # rows per Parquet row group: the unit rows_by_id can skip by id statistics


def count_videos(rows: pa.Table) -> dict[str, int]:
    """A manifest's ``counts`` of rows with ``uri`` and ``error``: distinct videos, rows with an embedding,
    videos without / with an error row."""
    videos = pc.count_distinct(rows["uri"]).as_py()
    failed = pc.count_distinct(pc.filter(rows["uri"], pc.is_valid(rows["error"]))).as_py()
    return {"videos": videos, "segments": rows["error"].null_count, "ok": videos - failed, "failed": failed}


@dataclass(frozen=True)
class IndexDelta:
    """A version's index as its base version's index file plus a delta: ids removed, parts whose embedded
    rows are added (see :meth:`Library.read_index`). No index file is written for it."""

    base: dict[str, Any]  # the base version's manifest entry for its index
    removed: tuple[int, ...]
    added: tuple[str, ...]  # part paths
    ntotal: int  # vectors of the index with the delta applied

    def entry(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in self.base.items() if k not in ("removed", "added")},
            "ntotal": self.ntotal,
            "file_ntotal": self.base.get("file_ntotal", self.base["ntotal"]),
            "removed": list(self.removed),
            "added": list(self.added),
        }


class LibraryWriter:
    """Writes part files and publishes versions of the library at ``location`` (a URI with ``options``, or
    a :class:`~pipeline.storage.Store`).

    ``embedding_dim`` and ``prompt_shape`` (the re-rank features' shape, ``None`` for a model family without
    them) fix the part schema (``part_schema``) that every part must have. Typical use::

        base = Library.current_version(uri)         # None for a new library
        parts = base.parts + [writer.write_part(table) for table in tables]
        version = writer.publish(parts, index, model, base)
    """

    def __init__(
        self,
        location: str | Store,
        options: StorageOptions | None = None,
        *,
        embedding_dim: int,
        prompt_shape: tuple[int, int] | None,
    ) -> None:
        self.store = as_store(location, options)
        self.embedding_dim = embedding_dim
        self.prompt_shape = tuple(prompt_shape) if prompt_shape else None
        self.schema = part_schema(embedding_dim, self.prompt_shape)
        self.writer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    @property
    def uri(self) -> str:
        return self.store.uri

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
        features = features_path(path)
        prompts = dense_rows(table[PROMPT], np.float16) if self.prompt_shape else None
        records = to_records(dense_rows(table["embedding"], np.float32), prompts, self.prompt_shape)
        features_crc = write_features(
            self.store, features, records
        )  # first: a part is complete once it exists
        stored = table.drop_columns([PROMPT]) if self.prompt_shape else table
        buffer = pa.BufferOutputStream()
        pq.write_table(stored, buffer, row_group_size=ROW_GROUP_ROWS, write_page_checksum=True)
        data = buffer.getvalue().to_pybytes()
        self.store.write_bytes(path, data)
        errors = table.num_rows - table["error"].null_count
        return PartInfo(
            path,
            table.num_rows,
            table.num_rows - errors,
            errors,
            crc32=zlib.crc32(data),
            file_bytes=len(data),
            features=features,
            features_crc32=features_crc,
        )

    def publish(
        self,
        parts: list[PartInfo],
        index: faiss.Index | IndexDelta,
        model: ModelIdentity,
        base: Version | None,
        extra: dict[str, Any] | None = None,
        **details: Any,
    ) -> Version:
        """Publish a version made of ``parts`` (all of its rows: keep the base's parts that stay) and
        ``index`` (the embeddings of their ok rows, under their ids), on top of ``base`` (``None`` for the
        first version). Returns the new version, which can be the base of the next publish.

        Raises :class:`ConcurrentWriteError` if another writer published after ``base``; what this call wrote
        then never becomes current. The steps are :meth:`prepare`, :meth:`claim` and :meth:`set_current`.
        """
        manifest = self.prepare(parts, index, model, base, extra, **details)
        return self.set_current(self.claim(manifest, base), base)

    def prepare(
        self,
        parts: list[PartInfo],
        index: faiss.Index | IndexDelta,
        model: ModelIdentity,
        base: Version | None,
        extra: dict[str, Any] | None = None,
        *,
        decode: dict[str, Any] | None = None,
        changes: dict[str, int] | None = None,
        trained_on: int | None = None,
        model_files: str | None = None,
        rows: pa.Table | None = None,
    ) -> dict[str, Any]:
        """Check the parts and the index, write the index file, and return the new version's manifest
        (its ``"version"`` still ``None``). An example manifest::

            {"format": 3, "version": 2, "parent": 1, "created": "2025-05-01T12:00:00+00:00",
             "writer": "host:4242:1a2b3c4d",
             "model": {"source": "/models/xclip-base-patch32", "sha256": "...", "family": "xclip"},
             "model_files": "<sha256 of the checkpoint's listing>",
             "embedding_dim": 512, "prompt_shape": [49, 512],
             "index": {"path": "index/<uuid>.faiss", "kind": "flat", "ntotal": 9, "trained_on": 9,
                       "crc32": 3735928559},
             "parts": [{"path": "parts/part-<uuid>.parquet", "rows": 10, "ok": 9, "errors": 1,
                        "crc32": 1165375254, "features": "features/part-<uuid>.npy",
                        "features_crc32": 2343432205, "deleted": [7]}],
             "counts": {"videos": 4, "segments": 8, "ok": 3, "failed": 1}, "next_id": 10,
             "decode": {"frames": 8, "segment_s": null},
             "changes": {"new": 1, "changed": 0, "deleted": 1, "unchanged": 3, "retried": 0,
                         "reused_rows": 8},
             "extra": {}}

        ``counts``: distinct videos (``uri``), rows with an embedding, videos without / with an error row, of
        the rows the version holds (``deleted`` ids of a part are left out). ``next_id``: the smallest id
        that no version up to this one has used. ``prompt_shape``: the re-rank features' shape, ``null`` for a
        model family without them. ``decode``: how the videos were decoded (a refresh reuses rows only when it
        decodes the same way). ``changes``: what changed since the parent. ``trained_on``: the vectors an IVF
        index was trained on (the index's own size when not given); ``crc32``: the index file's CRC-32,
        checked as it is read (its bytes can change without FAISS noticing). ``model_files``: the digest of
        the listing the model was loaded from (:func:`pipeline.embed.job_model.files_digest`; ``null`` when
        unknown): a job that finds the same files needs not load the model to know it. ``rows``: the ``id``,
        ``uri`` and ``error`` of the rows ``parts`` hold, where the caller has them (else they are read).
        """
        if base is not None and base.token is None:
            raise ValueError(
                f"version {base.number} was opened by number: publish on top of the current version instead"
            )
        if not isinstance(model, ModelIdentity):
            raise ValueError(f"model must be a ModelIdentity (where the weights came from), got {model!r}")
        if not isinstance(index, IndexDelta) and index.d != self.embedding_dim:
            raise ValueError(f"the index has dimension {index.d}, the parts' embeddings {self.embedding_dim}")
        if rows is None:
            rows = read_parts(self.store, parts, self.schema, ["id", "uri", "error"])
        counts = count_videos(rows)
        if index.ntotal != counts["segments"]:
            raise ValueError(
                f"the index holds {index.ntotal} vectors, the parts have {counts['segments']} embeddings"
            )
        max_id = pc.max(rows["id"]).as_py()
        next_id = max(base.manifest["next_id"] if base else 0, 0 if max_id is None else max_id + 1)

        if isinstance(index, IndexDelta):
            index_entry = index.entry()
        else:
            data = serialize(index)
            index_entry = {
                "path": f"index/{uuid.uuid4().hex}.faiss",
                "kind": kind_of(index),
                "ntotal": index.ntotal,
                "trained_on": index.ntotal if trained_on is None else trained_on,
                "crc32": zlib.crc32(data),
            }
            self.store.write_bytes(index_entry["path"], data)
        return {
            "format": FORMAT,
            "version": None,
            "parent": base.number if base else None,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "writer": self.writer_id,
            "model": model.to_dict(),
            "model_files": model_files,
            "embedding_dim": self.embedding_dim,
            "prompt_shape": list(self.prompt_shape) if self.prompt_shape else None,
            "index": index_entry,
            "parts": [part.to_dict() for part in parts],
            "counts": counts,
            "next_id": next_id,
            "decode": decode,
            "changes": changes,
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
                self.store.put_if(manifest_name(number), json.dumps(claimed, indent=1).encode(), None)
                return Version(number, claimed)
            except PreconditionFailed:
                if self.store.current_token(CURRENT) != (base.token if base else None):
                    raise self._lost(base) from None
                number += 1

    def set_current(self, version: Version, base: Version | None) -> Version:
        """Publish ``version`` (from :meth:`claim`): replace ``_current`` if it still names ``base``.

        If it does not, but names ``version`` already (a retried request that had succeeded), that is
        success too; otherwise raises :class:`ConcurrentWriteError`.
        """
        try:
            token = self.store.put_if(CURRENT, str(version.number).encode(), base.token if base else None)
        except PreconditionFailed:
            data, token = self.store.read_with_token(CURRENT)
            if int(data) != version.number:
                raise self._lost(base) from None
        return Version(version.number, version.manifest, token)

    def _lost(self, base: Version | None) -> ConcurrentWriteError:
        published = int(self.store.read_bytes(CURRENT))
        since = f"version {base.number}" if base else "the start"
        return ConcurrentWriteError(
            f"another writer published version {published} of {self.uri} meanwhile (this one started from "
            f"{since}); re-run"
        )
