"""The videos an in-process job is decoding, in a file that outlives a crash of its process."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any


class InFlightMarker:
    """A file that names the videos this process is decoding for ``library``, each removed when done.

    It lives in the machine's temporary directory (the in-process executor only runs on the job's own
    machine), keyed by the library's URI: ``{"pid": ..., "videos": {uri: tries}}``. ``begin``/``end`` are
    :class:`DecodeVideos`' crash ledger (called from several decoding threads): a video begun again after
    the process that decoded it died gets the count of those tries, so that a run forced in-process fails it
    after ``max_tries`` instead of crashing forever (a video that was merely decoding beside the culprit
    counts one try too: it needs ``max_tries`` such crashes to fail)."""

    def __init__(self, library: str) -> None:
        key = hashlib.blake2b(library.encode(), digest_size=10).hexdigest()
        self.path = Path(tempfile.gettempdir()) / "videosearch" / f"in-flight-{key}.json"
        self.lock = threading.Lock()
        self.videos: dict[str, int] = {}  # in flight here -> tries, this one included
        self.crashed: dict[str, int] | None = None  # a dead process's videos -> their tries (read once)

    def _dead(self) -> dict[str, int]:
        """The videos of a marker left behind by a dead process, with their tries; {} when there is none."""
        try:
            marker = json.loads(self.path.read_text())
            if _alive(marker.get("pid")):
                return {}
            return {str(uri): int(tries) for uri, tries in marker["videos"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def left_behind(self) -> str | None:
        """A video a dead process was decoding for this library, if it was decoding any."""
        return next(iter(sorted(self._dead())), None)

    def begin(self, uri: str) -> int:
        """Mark ``uri`` as being decoded; the number of earlier tries that died decoding it."""
        with self.lock:
            if self.crashed is None:
                self.crashed = self._dead()
            tries = self.crashed.get(uri, 0)
            self.videos[uri] = tries + 1
            self._write()
        return tries

    def end(self, uri: str) -> None:
        """``uri`` is decoded (or became an error row): no longer in flight."""
        with self.lock:
            self.videos.pop(uri, None)
            self._write()

    def clear(self) -> None:
        with self.lock:
            self.videos.clear()
            self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        if not self.videos:
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"pid": os.getpid(), "videos": self.videos}))
        temporary.replace(self.path)  # whole, whenever the process dies


def _alive(pid: Any) -> bool:
    """Whether the process ``pid`` is running (its marker was not left behind)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
