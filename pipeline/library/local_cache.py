"""Local copies of a remote library's immutable files, for a reader that opens the library again and again.

A library's files never change once written (parts and index files have names of their own), so a copy on
local disk stays right for as long as the file exists. ``videosearch query`` keeps what it reads of a
remote library here (the index file, the row lookup's columns of each part) and reads the copies next
time: a query of a library on S3 then reads ``_current``, the manifest and the re-rank records of its
candidates, not the index and every part again. ``videosearch serve`` does so where ``$VIDEOSEARCH_CACHE``
names a folder (a volume that outlives it: a restarted service reads its copies). ``embed`` and ``refresh``
keep the columns a refresh compares (:data:`~pipeline.library.refresh.PLAN_COLUMNS`) and the index file:
a refresh from the same machine reads the parts new since the last one.

Where: ``$VIDEOSEARCH_CACHE`` (a folder; ``off``: no cache), else ``$XDG_CACHE_HOME/videosearch``, else
``~/.cache/videosearch``; at most ``$VIDEOSEARCH_CACHE_GB`` GB (default 4), the least recently used copies
dropped first. Each copy carries its CRC-32: one that fails it (damaged on disk) is read again from the
library; a cache that cannot be written (a full disk, a read-only folder) is skipped, with a warning once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import uuid
import zlib
from pathlib import Path

from ..storage import Store

log = logging.getLogger(__name__)
DEFAULT_GB = 4.0


class LocalCache:
    """Copies of files under ``root``, by key, at most ``max_bytes`` in all. For one process at a time per
    key; processes sharing a folder may both write a copy (each written whole, then renamed into place)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int) -> None:
        self.root, self.max_bytes = Path(root), max_bytes
        self._warned = False

    @classmethod
    def from_env(cls, default_folder: bool = True) -> LocalCache | None:
        """The cache the environment names (see the module), or ``None`` where it says ``off`` (or names no
        folder, without ``default_folder``)."""
        where = os.environ.get("VIDEOSEARCH_CACHE", "")
        if where.strip().lower() == "off" or not (where or default_folder):
            return None
        if not where:
            try:
                where = os.path.join(
                    os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "videosearch"
                )
            except RuntimeError:  # no home folder (a container's user without one): no copies
                return None
        gb = os.environ.get("VIDEOSEARCH_CACHE_GB", str(DEFAULT_GB))
        try:
            max_bytes = int(float(gb) * 1e9)
        except ValueError:
            raise ValueError(f"VIDEOSEARCH_CACHE_GB must be a number of GB, got {gb!r}") from None
        return cls(where, max_bytes)

    @staticmethod
    def key(store: Store, name: str, detail: str = "") -> str:
        """The key of file ``name`` of ``store`` (its endpoint too: two servers may have the same bucket), and
        of what was kept of it (``detail``)."""
        return f"{store.options.endpoint_url or ''}|{store.url(name)}|{detail}"

    def get(self, key: str) -> memoryview | None:
        """The copy under ``key`` (now the most recently used), or ``None``: none, or one that fails its
        CRC-32 (a copy damaged on disk)."""
        path = self._path(key)
        try:
            kept = memoryview(path.read_bytes())  # its data a view, not a copy (an index: gigabytes)
            os.utime(path)
        except OSError:
            return None
        data, crc = kept[:-4], kept[-4:]
        return data if len(kept) >= 4 and zlib.crc32(data).to_bytes(4, "little") == crc else None

    def put(self, key: str, data: bytes) -> None:
        """Keep ``data`` under ``key``, dropping the least recently used copies past the size."""
        if len(data) + 4 > self.max_bytes:
            return
        path = self._path(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._make_room(len(data) + 4)
            partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
            with open(partial, "wb") as f:
                f.write(data)
                f.write(zlib.crc32(data).to_bytes(4, "little"))  # checked as it is read
            partial.replace(path)
        except OSError as err:
            if not self._warned:
                log.warning("videosearch: not keeping copies in %s: %s", self.root, err)
            self._warned = True

    def drop(self, key: str) -> None:
        """Forget the copy under ``key`` (one that failed its check)."""
        with contextlib.suppress(OSError):
            self._path(key).unlink()

    def _path(self, key: str) -> Path:
        return self.root / hashlib.sha256(key.encode()).hexdigest()

    def _make_room(self, wanted: int) -> None:
        copies = []
        for entry in os.scandir(self.root):
            with contextlib.suppress(OSError):  # another process may drop it meanwhile
                info = entry.stat()
                copies.append((info.st_mtime, info.st_size, entry.path))
        total = sum(size for _, size, _ in copies)
        for _, size, path in sorted(copies):
            if total + wanted <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                os.unlink(path)
            total -= size
