"""Garbage collection: delete the files that no kept version names.

``collect(root, keep=N)`` keeps the current version and the N - 1 published versions before it, and deletes
the other manifests, the part, re-rank record and index files that only they name, the parts of jobs that
never published, and the journals of dead writers. Never deleted:

* anything a kept version names (a part stays as long as any kept version references it);
* anything a running writer may still name: its journal's parts, and every file younger than ``grace_s``
  (a writer writes its parts before any manifest or journal names them);
* the files of a version that stopped being current less than ``grace_s`` ago: a reader that opened it
  then reads its files for a while yet.

Deleting is safe against readers of kept versions and against writers: a writer's new manifest only names
parts it wrote (young) or parts of the version it started from (current: kept).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from ..storage import Store, to_timestamp
from .features import FEATURES
from .journal import RUNS, alive, read_journals
from .manifest import GRACE_S, VERSIONS, all_versions, manifest_name

_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")


@dataclass
class Collected:
    """What ``collect`` kept and deleted (or would delete, with ``dry_run``)."""

    kept_versions: list[int]
    deleted_versions: list[int]
    deleted_files: list[str] = field(default_factory=list)
    deleted_bytes: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (
            f"kept versions {', '.join(map(str, self.kept_versions))}; {verb} versions "
            f"{', '.join(map(str, self.deleted_versions)) or 'none'}: {len(self.deleted_files)} files in all "
            f"({self.deleted_bytes / 2**20:.1f} MiB)"
        )


def collect(root: Store, keep: int, grace_s: float = GRACE_S, dry_run: bool = False) -> Collected:
    """Delete what no kept version names (see the module docstring); ``keep`` >= 1 versions are kept."""
    if keep < 1:
        raise ValueError(f"--keep must be at least 1 (the current version), got {keep}")
    now = time.time()
    _, manifests, chain = all_versions(root)  # chain: the published versions, newest first
    replaced_at = {older: _created(manifests[newer]) for newer, older in zip(chain, chain[1:], strict=False)}
    kept = set(chain[:keep]) | {n for n in chain if now - replaced_at.get(n, now) < grace_s}

    named = {name for n in kept for name in _names(manifests[n])}
    for journal in read_journals(root).values():
        if alive(journal, now):
            named |= {name for part in journal["parts"] for name in _part_files(part)}
            named.add(f"{RUNS}/{journal['run']}.json")
    named |= {manifest_name(n) for n in kept} | {"_current"}

    result = Collected(sorted(kept), sorted(set(manifests) - kept), dry_run=dry_run)
    for directory in ("parts", FEATURES, "index", VERSIONS, RUNS):
        for name, info in root.entries(directory).items():
            mtime = next((to_timestamp(info[k]) for k in _MTIME_KEYS if info.get(k) is not None), None)
            hidden = name.rsplit("/", 1)[-1].startswith(".")  # a local writer's lock file: in use any time
            if name in named or hidden or mtime is None or now - mtime < grace_s:
                continue
            result.deleted_files.append(name)
            result.deleted_bytes += int(info.get("size") or 0)
    if not dry_run:
        for name in result.deleted_files:
            root.delete(name)
    return result


def _created(manifest: dict[str, Any]) -> float:
    return datetime.fromisoformat(manifest["created"]).timestamp()


def _part_files(part: dict[str, Any]) -> list[str]:
    """A part's file and its re-rank records' file, if it has one."""
    return [part["path"], *([part["features"]] if part.get("features") else [])]


def _names(manifest: dict[str, Any]) -> set[str]:
    return {name for part in manifest["parts"] for name in _part_files(part)} | {manifest["index"]["path"]}
