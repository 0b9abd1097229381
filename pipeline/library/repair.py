"""``videosearch check --repair``: a new current version without the files that :func:`check` found wrong.

A part whose file or re-rank records are missing, damaged or inconsistent cannot be trusted, and its rows
cannot be made again without the videos. ``repair`` publishes, on top of the current version, a version
without those parts and without the other rows of their videos (a video enters a library whole or not at all:
one whose segments were split over two parts leaves with both), and with an index built anew from what stays,
of the current index's kind. The videos left out are no longer in the library, so the next ``videosearch
refresh`` of their source embeds them again. Problems with the index alone: the same, nothing left out (as
``reindex``). Nothing is deleted: the version before stays, for readers that hold it and for ``rollback``.

A video split over parts is found by its segments: those that stay must run from 0 without a gap, and its next
segment's id (:func:`~pipeline.library.schema.row_id`) must not be one of the lost rows, which are read from
the dropped parts where they can be read, and otherwise taken from the index (its ids that no part that stays
has). Where neither can be read, a video whose last segments were in a dropped part stays without them (a
refresh does not see it as changed): ``rollback`` to a version without the problem is the better remedy then.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..storage import StorageOptions, Store, as_store
from .check import Checked, counted
from .index import ids_of
from .journal import maintenance
from .manifest import DamagedLibraryError, NotALibraryError, PartInfo, current_version
from .reader import Library, read_each, read_index_file, read_part
from .reindex import publish_reindexed
from .schema import row_id


@dataclass
class Repaired:
    """What :func:`repair` published: the new version, the parts it left out and how many videos."""

    version: int
    dropped_parts: list[str]
    dropped_videos: int
    index: str  # the new index, in words

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        if not self.dropped_parts:
            return f"version {self.version}: the index built anew ({self.index}), now current"
        return (
            f"version {self.version}: without {counted(len(self.dropped_parts), 'part')} and their "
            f"{counted(self.dropped_videos, 'video')}, {self.index}, now current; `videosearch refresh` of "
            "the source embeds them again"
        )


def repair(location: str | Store, checked: Checked, options: StorageOptions | None = None) -> Repaired | None:
    """Publish the current version without what ``checked`` (a :func:`check` of the current version) found
    wrong; ``None`` when it found nothing. Raises :class:`~pipeline.library.manifest.ConcurrentWriteError` if
    another writer published since, :class:`~pipeline.library.journal.LibraryBusyError` while a job writes
    the library, and ``ValueError`` when ``checked`` is of another version."""
    root = as_store(location, options)
    with maintenance(root, "check --repair"):
        return _repair(root, checked)


def _repair(root: Store, checked: Checked) -> Repaired | None:
    current = current_version(root)
    if current is None:
        raise NotALibraryError(f"{root.uri} is not a videosearch library (it has no _current)")
    if checked.version != current.number:
        raise ValueError(
            f"only the current version ({current.number}) can be repaired, the check read version "
            f"{checked.version}: roll back to it first (`videosearch rollback --to {checked.version}`)"
        )
    if checked.ok:
        return None
    wrong = {problem.path for problem in checked.problems}
    dropped = [part for part in current.parts if part.path in wrong or part.features in wrong]
    kept = [part for part in current.parts if part not in dropped]
    library = Library(root, current)
    tables = read_each(root, kept, library.schema, ["id", "uri", "segment", "error"])
    rows = pa.concat_tables([library.schema.empty_table().select(["id", "uri", "segment", "error"]), *tables])
    staying = set(rows["id"].to_pylist())
    leaving = pa.array(sorted(_split_videos(rows, _lost_ids(library, dropped, staying))), pa.string())
    gone = set(rows.filter(pc.is_in(rows["uri"], value_set=leaving))["id"].to_pylist())
    kept = [part.masked(gone & set(t["id"].to_pylist())) for part, t in zip(kept, tables, strict=True)]
    staying_videos = set(rows["uri"].to_pylist()) - set(leaving.to_pylist())
    videos = current.manifest["counts"]["videos"] - len(staying_videos)
    version = publish_reindexed(
        root,
        current,
        kept,
        current.manifest["index"].get("kind", "auto"),
        extra={"repaired": sorted(wrong)},
        changes={"dropped": videos} if dropped else None,
    )
    index = version.manifest["extra"]["reindexed"]
    return Repaired(version.number, [part.path for part in dropped], videos, index)


def _lost_ids(library: Library, dropped: list[PartInfo], staying: set[int]) -> set[int]:
    """The ids of the rows that leave with ``dropped``: read from each where it can be, and the index's ids
    that no row in ``staying`` has (where the index can be read)."""
    lost: set[int] = set()
    for part in dropped:
        with contextlib.suppress(DamagedLibraryError):  # missing or unreadable: the index may know them
            lost.update(read_part(library.store, part, library.schema, ["id"])["id"].to_pylist())
    entry = library.manifest["index"]
    try:
        held = set(ids_of(read_index_file(library.store, entry)).tolist())
    except DamagedLibraryError:
        return lost
    return lost | (held - set(entry.get("removed", ())) - staying)


def _split_videos(rows: pa.Table, lost: set[int]) -> set[str]:
    """The videos of ``rows`` (id, uri, segment) that had rows among ``lost`` too: their segments do not run
    from 0 without a gap, or their next segment's id is lost."""
    segments: dict[str, list[int]] = defaultdict(list)
    for uri, segment in zip(rows["uri"].to_pylist(), rows["segment"].to_pylist(), strict=True):
        segments[uri].append(segment)
    return {
        uri
        for uri, numbers in segments.items()
        if sorted(numbers) != list(range(len(numbers))) or row_id(uri, max(numbers) + 1) in lost
    }
