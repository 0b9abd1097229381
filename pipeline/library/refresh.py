"""Refresh: what changed between a source's listing and a library version, and the parts that stay.

An object is the same as the one a version holds when its uri and its fingerprint are: the ETag where the
store gives one, else size and modification time. Then:

* new (not in the version) and changed (another fingerprint) objects are decoded and encoded; so are objects
  that failed before (an error row), unless ``retry_failed`` is off;
* deleted objects (no longer listed), and the old rows of changed and retried ones, leave the version;
* moved objects (a deleted object's content listed under a new uri) are not embedded again: their rows are
  written anew under the new uri (:func:`copy_rows`; embeddings, re-rank features and thumbnails as they
  were). An object has moved when a new object's fingerprint equals a deleted one's, neither another new
  nor another deleted object shares it, and the fingerprint can tell contents apart: an ETag, or size and
  modification time (``mv`` and ``aws s3 mv`` keep them; a copy that gets a new ETag or date is embedded);
* copied objects (a new uri whose ETag is a content hash, :func:`content_hash`, that a whole video of the
  version was embedded under) take a copy of that video's rows the same way, whether or not the original
  stays: ``aws s3 cp`` within a bucket, or the same file uploaded twice. Only an MD5 ETag (S3 and its
  peers for objects uploaded whole or in parts) says the contents are equal; other ETags (an HTTP server's
  date and size, SSE-KMS, GCS generations) do not, so there a copy is embedded as any new object. A new local
  file (``cp``, ``cp -p``: no ETag) is compared byte for byte (:func:`same_local_bytes`) with the library's
  videos of its size whose files are still there unchanged, at most :data:`LOCAL_COMPARED` of them (those
  of its name and date first): equal bytes make it a copy;
* every other row stays where it is: a part whose rows all stay is referenced by the new manifest as it is.

Rows leave a part by a deletion mask (the part's ``deleted`` ids in the manifest), not by rewriting the part:
a refresh then writes only its new rows, the index and a manifest, whatever the library's size. A part whose
rows would be mostly masked (more than :data:`REWRITE_MASKED_FRACTION`) is rewritten with the rows it keeps,
so that masks never make readers skip more than they read; a part with no row left is dropped. Small parts
(each refresh writes one for its few new rows) are merged once :data:`MERGE_SMALL_PARTS` of them hold fewer
than :data:`SMALL_PART_ROWS` rows each: a library refreshed every hour for a year keeps a few parts per
:data:`~pipeline.library.writer.PART_ROWS` rows, not one per refresh, and a reader opening it (one or two
requests per part on S3) or a refresh comparing with it pays for its rows, not for its history. Rewritten
rows are written together, at most ``PART_ROWS`` to a part (:func:`rewrite_parts`).

The index, likewise, is not rewritten for a small change: the new version names its base's index file and a
delta (ids removed, parts whose rows are added; :func:`index_delta`), applied by readers as they load it.
Once the delta outgrows :data:`DELTA_MAX_FRACTION` of the file, a new index file is written. Rewriting parts
changes no index: their rows keep their ids and vectors, so the delta goes on naming the same file (rows of
the delta's parts are rewritten apart from the file's, into parts the delta then names).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..storage import Store, each_at_once
from .local_cache import LocalCache
from .lookup import PartTables, held_rows
from .manifest import PartInfo
from .reader import READ_THREADS, Library, read_each, read_part, read_parts
from .schema import LISTED, row_id
from .writer import PART_ROWS, IndexDelta, LibraryWriter

REWRITE_MASKED_FRACTION = 0.5
SMALL_PART_ROWS = PART_ROWS // 4  # a part keeping fewer rows than this is small...
MERGE_SMALL_PARTS = 8  # ...and this many small parts are merged (rewritten together)
DELTA_MAX_FRACTION = (
    0.1  # an index delta grows up to this fraction of its file's vectors, then a file is written
)
PLAN_COLUMNS = ["id", "uri", "etag", "size", "mtime", "error"]  # what a refresh reads of each part
LOCAL_COMPARED = 4  # library videos of a new local file's size that its bytes are compared with, at most
COMPARED_CHUNK = 1 << 20
_MD5_ETAG = re.compile(r'"?[0-9a-fA-F]{32}(-[0-9]+)?"?')


@dataclass(frozen=True)
class Changes:
    """What a refresh found, in objects (videos), and how many rows of the version it keeps."""

    new: int = 0
    changed: int = 0
    moved: int = 0  # deleted objects whose content a new uri holds: rows moved, nothing embedded
    copied: int = 0  # new objects with the content of a video of the version (an MD5 ETag): rows copied
    deleted: int = 0
    unchanged: int = 0
    retried: int = 0  # objects that failed before and are tried again
    reused_rows: int = 0  # rows of the base version kept as they are
    resumed_rows: int = 0  # rows a killed job had finished, reused instead of embedding their objects again

    @property
    def nothing(self) -> bool:
        """Nothing to embed and nothing to delete: the version stays as it is."""
        return not (self.new or self.changed or self.moved or self.copied or self.deleted or self.retried)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def text(self) -> str:
        resumed = f", {self.resumed_rows} rows resumed from a stopped job" if self.resumed_rows else ""
        return (
            f"{self.new} new, {self.changed} changed, {self.moved} moved, {self.copied} copied, "
            f"{self.deleted} deleted, {self.retried} retried, "
            f"{self.unchanged} unchanged ({self.reused_rows} rows reused{resumed})"
        )


@dataclass
class RefreshPlan:
    """The objects to embed, the base's parts that stay (masked where they lose rows), the parts to
    rewrite, the objects that moved or were copied, and the ids of the embedded rows that leave the index."""

    to_embed: list[dict[str, Any]]
    # a base video's uri -> the listed rows that take a copy of its rows (it moved or was copied there)
    copies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # the base's parts that hold those rows, as the base has them
    copied_from: list[PartInfo] = field(default_factory=list)
    kept: list[PartInfo] = field(default_factory=list)
    # mostly masked parts, and small ones to merge: their kept rows go into new parts
    rewrite: list[PartInfo] = field(default_factory=list)
    gone_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    changes: Changes = field(default_factory=Changes)
    # the base's parts' columns the plan read (``PLAN_COLUMNS``, every row: masks not applied), by path
    tables: dict[str, pa.Table] = field(default_factory=dict)


def fingerprint(row: dict[str, Any]) -> tuple:
    """What tells two versions of an object apart: its ETag, else its size and modification time."""
    return ("etag", row["etag"]) if row.get("etag") else ("size", row["size"], row["mtime"])


def plan_refresh(
    base: Library | None,
    listed: list[dict[str, Any]],
    retry_failed: bool = True,
    same_bytes: Callable[[str, str], bool] | None = None,
) -> RefreshPlan:
    """Compare ``listed`` (the source's listing, sorted by uri) with the ``base`` version's rows.
    ``same_bytes(new, old)`` tells whether a new object without an ETag holds the bytes of an unchanged one
    (:func:`same_local_bytes` for a local source; ``None``: such objects are never copies). The base's parts
    are read from their local copies where ``base.cache`` has them (a remote library refreshed from the same
    machine again reads the parts that are new since), and copied there."""
    if base is None:
        return RefreshPlan(list(listed), changes=Changes(new=len(listed)))
    parts = base.snapshot.parts
    videos: dict[str, dict[str, Any]] = {}  # uri -> fingerprint, failed, ids per part, embedded ids
    tables = PartTables(base.cache, PLAN_COLUMNS).read(base.store, parts, base.schema)
    for part, table in zip(parts, tables, strict=True):
        for row in kept_rows(table, part).to_pylist():
            video = videos.setdefault(row["uri"], {"print": fingerprint(row), "failed": False, "rows": []})
            video["failed"] |= row["error"] is not None
            video["rows"].append((part.path, row["id"], row["error"] is None))

    listing = {row["uri"]: row for row in listed}
    kinds = {uri: _compare(listing.get(uri), video, retry_failed) for uri, video in videos.items()}
    added = [row for row in listed if row["uri"] not in videos]
    gone = {uri: video for uri, video in videos.items() if kinds[uri] == "deleted" and not video["failed"]}
    moves = _moves(gone, added)
    kinds.update(dict.fromkeys(moves, "moved"))
    moved_to = {row["uri"] for row in moves.values()}
    unchanged = {uri for uri, kind in kinds.items() if kind == "unchanged"}
    copies = _copies(videos, [row for row in added if row["uri"] not in moved_to], unchanged, same_bytes)
    counts: dict[str, int] = defaultdict(int)
    for kind in kinds.values():
        counts[kind] += 1
    counts["copied"] = sum(len(rows) for rows in copies.values())
    counts["new"] = len(added) - len(moves) - counts["copied"]
    for uri, row in moves.items():
        copies.setdefault(uri, []).append(row)
    leaving = {uri for uri, kind in kinds.items() if kind != "unchanged"}
    arrived = {row["uri"] for rows in copies.values() for row in rows}
    to_embed = [
        row
        for row in listed
        if (row["uri"] not in videos and row["uri"] not in arrived) or row["uri"] in leaving
    ]

    masks: dict[str, set[int]] = defaultdict(set)
    gone_ids = []
    for uri in leaving:
        for path, id_, embedded in videos[uri]["rows"]:
            masks[path].add(id_)
            if embedded:
                gone_ids.append(id_)
    copied_from = {path for uri in copies for path, _, _ in videos[uri]["rows"]}
    plan = RefreshPlan(
        to_embed,
        copies=copies,
        copied_from=[part for part in parts if part.path in copied_from],
        gone_ids=np.array(sorted(gone_ids), np.int64),
        tables={part.path: table for part, table in zip(parts, tables, strict=True)},
    )
    for part in parts:
        part = part.masked(masks[part.path]) if masks[part.path] else part
        if len(part.deleted) >= part.rows:
            continue  # no row left
        (plan.rewrite if len(part.deleted) > REWRITE_MASKED_FRACTION * part.rows else plan.kept).append(part)
    small = [part for part in plan.kept if part.rows - len(part.deleted) < SMALL_PART_ROWS]
    if len(small) >= MERGE_SMALL_PARTS:
        merged = {part.path for part in small}
        plan.kept = [part for part in plan.kept if part.path not in merged]
        plan.rewrite += small
    reused = sum(part.rows - len(part.deleted) for part in plan.kept + plan.rewrite)
    plan.changes = Changes(**counts, reused_rows=reused)
    return plan


def _moves(gone: dict[str, dict[str, Any]], added: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Of the deleted objects ``gone`` (uri -> its fingerprint and rows, none an error row) and the ``added``
    (listed rows of new uris), the pairs that hold the same content: old uri -> new listed row. A fingerprint
    shared by two deleted or two new objects moves nothing (which went where cannot be told), nor does one
    without an ETag or a modification time (size alone does not tell videos apart)."""
    old: dict[tuple, list[str]] = defaultdict(list)
    for uri, video in gone.items():
        old[video["print"]].append(uri)
    new: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in added:
        new[fingerprint(row)].append(row)
    return {
        uris[0]: new[key][0]
        for key, uris in old.items()
        if len(uris) == 1 and len(new.get(key, ())) == 1 and _tells_contents_apart(key)
    }


def _copies(
    videos: dict[str, dict[str, Any]],
    added: list[dict[str, Any]],
    unchanged: set[str],
    same_bytes: Callable[[str, str], bool] | None,
) -> dict[str, list[dict[str, Any]]]:
    """Of the ``added`` listed rows, those that hold the bytes of a whole video of ``videos`` (the base's:
    uri -> fingerprint, failed, rows): an MD5 ETag (:func:`content_hash`) that the video was embedded under,
    or, without an ETag, ``same_bytes`` with one of the ``unchanged`` videos of its size. That video's uri ->
    them."""
    if not added:
        return {}
    prints = {fingerprint(row) for row in added}  # only these can be found: the base is not sorted whole
    whole: dict[tuple, str] = {}  # of videos of one fingerprint, the last uri in order
    for uri, video in videos.items():
        if video["print"] in prints and not video["failed"]:
            whole[video["print"]] = max(uri, whole.get(video["print"], uri))
    sizes = {("size", row["size"]) for row in added if not row["etag"]} if same_bytes else set()
    sized: dict[int, list[str]] = defaultdict(list)  # ETag-less unchanged videos of those sizes, by size
    for uri in sorted(uri for uri in unchanged if sizes and videos[uri]["print"][:2] in sizes):
        if not videos[uri]["failed"]:
            sized[videos[uri]["print"][1]].append(uri)
    copies: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in added:
        original = whole.get(fingerprint(row))
        if original is None or not content_hash(row["etag"]):
            original = _same_file(row, sized, videos, same_bytes) if same_bytes and not row["etag"] else None
        if original is not None:
            copies[original].append(row)
    return dict(copies)


def _same_file(
    row: dict[str, Any],
    sized: dict[int, list[str]],
    videos: dict[str, dict[str, Any]],
    same_bytes: Callable[[str, str], bool],
) -> str | None:
    """The first of at most :data:`LOCAL_COMPARED` videos of ``row``'s size (those of its name, then of its
    modification time, first) whose bytes ``row``'s object holds."""
    name = row["uri"].rsplit("/", 1)[-1]

    def likeness(uri: str) -> tuple[bool, bool]:
        return uri.rsplit("/", 1)[-1] != name, videos[uri]["print"][2] != row["mtime"]

    candidates = sorted(sized.get(row["size"], ()), key=likeness)[:LOCAL_COMPARED]
    return next((uri for uri in candidates if same_bytes(row["uri"], uri)), None)


def same_local_bytes(new: str, old: str) -> bool:
    """Whether two local files (paths or ``file://`` URIs) hold the same bytes: read side by side, a MiB at a
    time, stopping at the first difference (two different videos differ within the first MiBs). A file that
    cannot be read is not a copy (it is embedded, and its error said there)."""
    try:
        with open(_local_path(new), "rb") as a, open(_local_path(old), "rb") as b:
            while True:
                chunk = a.read(COMPARED_CHUNK)
                if chunk != b.read(COMPARED_CHUNK):
                    return False
                if not chunk:
                    return True
    except OSError:
        return False


def _local_path(uri: str) -> str:
    return uri.removeprefix("file://")


def content_hash(etag: str | None) -> bool:
    """Whether ``etag`` is an MD5 of the object's content: S3's for an object uploaded whole (32 hex digits),
    or for one uploaded in parts (an MD5 of the parts' MD5s, then ``-`` and the part count), quoted or not.
    Two objects with such an ETag hold the same bytes; other ETags may name a date and size, or nothing."""
    return etag is not None and _MD5_ETAG.fullmatch(etag) is not None


def _tells_contents_apart(print_: tuple) -> bool:
    """Whether a :func:`fingerprint` can stand for an object's content: an ETag, or a size with a
    modification time (a size alone cannot)."""
    return print_[0] == "etag" or print_[2] is not None


def _compare(listed: dict[str, Any] | None, video: dict[str, Any], retry_failed: bool) -> str:
    if listed is None:
        return "deleted"
    if fingerprint(listed) != video["print"]:
        return "changed"
    return "retried" if video["failed"] and retry_failed else "unchanged"


def kept_rows(table: pa.Table, part: PartInfo) -> pa.Table:
    """The rows of ``table`` (columns of every row of ``part``, ``id`` among them) that its mask keeps."""
    return table.filter(held_rows(table, part)) if part.deleted else table


def version_rows(
    store: Store,
    schema: pa.Schema,
    plan: RefreshPlan,
    parts: list[PartInfo],
    columns: list[str],
    cache: LocalCache | None = None,
) -> pa.Table:
    """The ``columns`` (of :data:`PLAN_COLUMNS`) of the rows that ``parts`` hold, masks applied: the base's
    parts from the tables the plan read, the others (written by the job) read, and copied into ``cache`` for
    the next refresh's plan."""
    written = [part for part in parts if part.path not in plan.tables]
    read = PartTables(cache, PLAN_COLUMNS).read(store, written, schema)
    tables = plan.tables | {part.path: table for part, table in zip(written, read, strict=True)}
    if not parts:
        return schema.empty_table().select(columns)
    return pa.concat_tables([kept_rows(tables[part.path], part).select(columns) for part in parts])


def whole_videos(writer: LibraryWriter, parts: list[PartInfo]) -> list[PartInfo]:
    """``parts`` with the embedded rows of every video that also has an error row masked: a video enters a
    version whole or as its error row (a decoder hands on a long video's segments in batches, and the video
    may fail after some of them)."""
    tables = read_each(writer.store, parts, writer.schema, ["id", "uri", "error"])
    failed = {uri for table in tables for uri in table.filter(pc.is_valid(table["error"]))["uri"].to_pylist()}
    if not failed:
        return parts
    masked = []
    for part, table in zip(parts, tables, strict=True):
        partial = table.filter(
            pc.and_(pc.is_null(table["error"]), pc.is_in(table["uri"], pa.array(list(failed))))
        )
        masked.append(part.masked(set(partial["id"].to_pylist())) if partial.num_rows else part)
    return masked


def index_delta(
    base: dict[str, Any], gone_ids: np.ndarray, new_parts: list[PartInfo], parts: list[PartInfo], ntotal: int
) -> IndexDelta | None:
    """The new version's index as the base's index file plus a delta (see ``IndexDelta``), or ``None`` where
    a new index file is due: the delta would exceed :data:`DELTA_MAX_FRACTION` of the file's vectors, or the
    index is HNSW (it cannot delete: every reader would rebuild it). ``parts``: all of the new version's."""
    if base["kind"] == "hnsw":
        return None
    present = {part.path: part for part in parts}
    added = [path for path in base.get("added", ()) if path in present]
    added += [part.path for part in new_parts if part.ok]
    removed = set(base.get("removed", ())) | set(gone_ids.tolist())
    size = len(removed) + sum(present[path].ok for path in added)
    if size > DELTA_MAX_FRACTION * base.get("file_ntotal", base["ntotal"]):
        return None
    return IndexDelta(base, tuple(sorted(removed)), tuple(added), ntotal)


def rewrite_parts(
    writer: LibraryWriter, parts: list[PartInfo], delta_parts: frozenset[str] = frozenset()
) -> tuple[list[PartInfo], list[PartInfo]]:
    """The rows that ``parts`` keep, written anew, at most :data:`~pipeline.library.writer.PART_ROWS` to a
    part: the new parts holding rows of the index file, and those holding rows of the parts whose paths
    ``delta_parts`` names (the base index's delta adds them). The two are never mixed, so that the new
    version's delta names the latter in their place, and the index stays the same."""

    def rewritten(group: list[PartInfo]) -> list[PartInfo]:
        table = read_parts(writer.store, group, writer.schema)
        return [
            writer.write_part(table.slice(start, PART_ROWS)) for start in range(0, table.num_rows, PART_ROWS)
        ]

    return (
        rewritten([part for part in parts if part.path not in delta_parts]),
        rewritten([part for part in parts if part.path in delta_parts]),
    )


def copy_rows(writer: LibraryWriter, base: Library, plan: RefreshPlan) -> list[PartInfo]:
    """The rows of the videos that moved or were copied (``plan.copies``) under their new uris, written as new
    parts, one per base part that held some: ids, uri and listing columns of the new object; embeddings,
    re-rank features, thumbnails and the rest as they were (the same content, decoded and encoded the same
    way)."""
    wanted = pc.field("uri").isin(list(plan.copies))

    def copy(part: PartInfo) -> PartInfo:
        table = read_part(base.store, part, base.schema, filter=wanted)
        taken = [(i, row) for i, uri in enumerate(table["uri"].to_pylist()) for row in plan.copies[uri]]
        table = table.take([i for i, _ in taken])
        segments = table["segment"].to_pylist()
        columns = {name: [row[name] for _, row in taken] for name in LISTED}
        columns["id"] = [row_id(row["uri"], s) for (_, row), s in zip(taken, segments, strict=True)]
        for name, values in columns.items():
            where = table.schema.get_field_index(name)
            table = table.set_column(where, name, pa.array(values, table.schema.field(name).type))
        return writer.write_part(table)

    return each_at_once(copy, plan.copied_from, READ_THREADS)
