"""A library's versions as a user sees them: number, time, counts, model, what changed; which are published;
and rolling back to one of them.

A version was published when ``_current`` named it: the current version and its parents, back to the first.
Other manifests were claimed by writers that crashed or lost a race; they were never current.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from xclip_core.identity import ModelIdentity

from ..storage import StorageOptions, Store, as_store
from .journal import maintenance
from .manifest import NotALibraryError, Version, all_versions, current_version, read_manifest
from .writer import LibraryWriter


@dataclass(frozen=True)
class VersionInfo:
    number: int
    created: str
    published: bool  # named by _current at some time (the current version or one of its parents)
    current: bool
    counts: dict[str, int]
    model: str
    changes: dict[str, int] | None
    copy_of: int | None = None  # a rollback: the version this one republished

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        mark = "*" if self.current else " " if self.published else "-"
        counts = self.counts
        line = (
            f"{mark} {self.number:4d}  {self.created}  {counts['videos']} videos ({counts['ok']} ok, "
            f"{counts['failed']} failed, {counts['segments']} segments)  model {self.model}"
        )
        if self.copy_of is not None:
            line += f"  (rollback: a copy of version {self.copy_of})"
        if self.changes:
            line += "  changes: " + ", ".join(
                f"{n} {k}" for k, n in self.changes.items() if n and k != "reused_rows"
            )
        return line if self.published else line + "  (never published)"


def history(location: str | Store, options: StorageOptions | None = None) -> list[VersionInfo]:
    """Every version of the library, oldest first."""
    current, manifests, published = all_versions(as_store(location, options))
    return [
        VersionInfo(
            number=n,
            created=m.get("created", ""),
            published=n in published,
            current=n == current.number,
            counts=m["counts"],
            model=ModelIdentity.from_dict(m["model"]).source,
            changes=m.get("changes"),
            copy_of=(m.get("extra") or {}).get("rollback_of"),
        )
        for n, m in sorted(manifests.items())
    ]


def rollback(location: str | Store, to: int, options: StorageOptions | None = None) -> Version:
    """Publish version ``to`` again, as a new version on top of the current one (its parts, index, model and
    counts: nothing is re-embedded). A version whose files ``gc`` deleted cannot come back. Raises
    :class:`~pipeline.library.journal.LibraryBusyError` while a job writes the library."""
    root = as_store(location, options)
    with maintenance(root, "rollback"):
        current = current_version(root)
        if current is None:
            raise NotALibraryError(f"{root.uri} is not a videosearch library (it has no _current)")
        if to == current.number:
            raise ValueError(f"version {to} of {root.uri} is already the current version")
        manifest = read_manifest(root, to)
        writer = LibraryWriter(
            root, embedding_dim=manifest["embedding_dim"], prompt_shape=manifest["prompt_shape"]
        )
        copy = {
            **manifest,
            "parent": current.number,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "writer": writer.writer_id,
            "next_id": max(manifest.get("next_id", 0), current.manifest.get("next_id", 0)),
            "changes": None,
            "extra": {**(manifest.get("extra") or {}), "rollback_of": to},
        }
        return writer.set_current(writer.claim(copy, current), current)
