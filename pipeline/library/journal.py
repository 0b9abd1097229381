"""A running writer's journal: the parts it has finished, and its lease on the library.

``runs/<run-id>.json`` is written when a job starts and rewritten each time one of its parts is written::

    {"run": "<run-id>", "command": "refresh", "host": "...", "pid": 4242, "started": "...",
     "expires": 1764600000.0, "model": "<weights sha256>", "decode": {"frames": 8, "segment_s": null},
     "parts": [<PartInfo>...]}

* **Resume.** A job killed at any moment leaves its journal behind. The next job on the library (same model,
  same decoding) takes the journal over: the finished parts' rows of objects that are still to be embedded,
  and complete (every segment embedded), are reused instead of being decoded and encoded again; objects that
  failed are tried again. Its journal goes once the new version is published.
* **Lease.** A journal whose writer is alive keeps other writers out: a second job fails at once with a
  message that names the first, instead of doing the whole job a second time. A writer is alive until its
  lease expires (:data:`LEASE_S` after its last write; a running job renews it every :data:`RENEW_S`), or,
  on the same host, until its process is gone: the rerun of a killed job does not wait for the expiry.
  Writers that start together could all find no live journal; so each then writes its own and claims
  :data:`LEASE` (the run holding the lease) by compare-and-swap, unless the run it names is alive: exactly one
  of them gets it, and the others remove their journals and fail as above. The commands that publish without
  embedding (``reindex``, ``rollback``, ``check --repair``) hold the lease too (:func:`maintenance`): a job
  and such a command never run into each other's compare-and-swap after doing their work.

Nothing of a journal is ever part of a version: a part becomes one only when a manifest lists it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pyarrow.compute as pc

from xclip_core.sampling import segments

from ..storage import ObjectNotFound, PreconditionFailed, StorageError, Store
from .manifest import LibraryError, PartInfo
from .reader import read_parts
from .refresh import fingerprint
from .schema import part_schema

log = logging.getLogger(__name__)

RUNS = "runs"
LEASE = "_lease"  # {"run": ...}: the writer holding the lease, replaced by compare-and-swap
LEASE_S = 600.0  # a writer that has not renewed its lease for this long is taken for dead
RENEW_S = 60.0


class LibraryBusyError(LibraryError):
    """Another writer is working on the library and its lease has not expired."""


def alive(journal: dict[str, Any], now: float) -> bool:
    """Whether the writer of ``journal`` may still be running (see the module docstring)."""
    if journal["expires"] < now:
        return False
    if journal["host"] != socket.gethostname():
        return True  # another machine's process: trust its lease
    try:
        os.kill(int(journal["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_journals(root: Store) -> dict[str, dict[str, Any]]:
    """The journals under ``runs/`` by name (``runs/<run>.json``), those that finish meanwhile left out, and
    not the temporary files that a journal's atomic rewrite leaves there a moment (``.<run>.json.<id>.tmp``
    on local disk: read half-written, they once broke a writer starting beside another)."""
    journals = {}
    for name in root.names(RUNS):
        if name.startswith(".") or not name.endswith(".json"):
            continue
        try:
            journals[f"{RUNS}/{name}"] = json.loads(root.read_bytes(f"{RUNS}/{name}"))
        except ObjectNotFound:
            continue
    return journals


class Journal:
    """This job's journal and lease on the library at ``root``, and the finished parts of dead writers that
    it may reuse (none unless ``resume``: their journals are then left for a job that can). ``command`` (the
    CLI's word, "embed", "refresh", "reindex"...) names the writer to those it keeps out. Use as a context
    manager: the lease is renewed while the block runs."""

    def __init__(
        self, root: Store, model_sha256: str, decode: dict[str, Any], command: str, resume: bool = True
    ) -> None:
        self.root, self.command, self.resume = root, command, resume
        self.run = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        self.name = f"{RUNS}/{self.run}.json"
        self.model, self.decode = model_sha256, decode
        self.parts: list[PartInfo] = []
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.taken_over: list[str] = []  # journals of dead writers, removed with ours
        self.left: list[PartInfo] = []  # their finished parts, for the same model and decoding
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._finished = False

    def __enter__(self) -> Journal:
        now = time.time()
        for name, journal in read_journals(self.root).items():
            if alive(journal, now):
                raise self._busy(journal)
            if not self.resume:
                continue
            self.taken_over.append(name)
            if journal["model"] == self.model and journal["decode"] == self.decode:
                self.left += [PartInfo.from_dict(part) for part in journal["parts"]]
        self._write()  # before the claim: a writer that finds the lease ours then finds us alive
        try:
            self._claim()
        except BaseException:
            with contextlib.suppress(StorageError):  # refused: no journal of ours is left to look alive
                self.root.delete(self.name)  # (or, with the store down, it expires)
            raise
        self._renewer = threading.Thread(target=self._renew, name="videosearch-lease", daemon=True)
        self._renewer.start()
        return self

    def _claim(self) -> None:
        """Take :data:`LEASE` by compare-and-swap, unless the run it names is alive."""
        holder, token = self._holder()
        if holder is not None:
            raise self._busy(holder)
        try:
            self.root.put_if(LEASE, json.dumps({"run": self.run}).encode(), token)
        except PreconditionFailed:  # another writer claimed it since we read it
            holder, _ = self._holder()
            raise self._busy(holder) from None

    def _holder(self) -> tuple[dict[str, Any] | None, str | None]:
        """The live journal of the run that :data:`LEASE` names (``None``: no lease, or a dead writer's),
        and the lease's version token (``None``: no lease yet)."""
        try:
            data, token = self.root.read_with_token(LEASE)
        except ObjectNotFound:
            return None, None
        try:
            journal = json.loads(self.root.read_bytes(f"{RUNS}/{json.loads(data)['run']}.json"))
        except ObjectNotFound:  # finished: its journal went with it
            return None, token
        except (ValueError, KeyError, TypeError):  # not a lease this code wrote: it names no live writer
            return None, token
        return (journal if alive(journal, time.time()) else None), token

    def _busy(self, journal: dict[str, Any] | None) -> LibraryBusyError:
        """The error for a library whose lease the writer of ``journal`` holds (``None``: one now done)."""
        if journal is None:
            return LibraryBusyError(
                f"{self.root.uri} is being written by another job, which took its lease as this one started"
            )
        expires = datetime.fromtimestamp(journal["expires"], timezone.utc).isoformat(timespec="seconds")
        command = f"`videosearch {journal['command']}`, " if "command" in journal else ""  # older journals
        writer = f"{command}run {journal['run']}, {journal['host']} pid {journal['pid']}"
        return LibraryBusyError(
            f"{self.root.uri} is being written by another job ({writer}, since {journal['started']}); "
            f"wait for it, or, if it is gone, until its lease "
            f"expires at {expires}"
        )

    def __exit__(self, error: type[BaseException] | None, *exc: object) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if error is not None and not self._finished:
            try:  # failed: the lease goes, the finished parts stay for the next job
                self._write(expires=0.0)
            except StorageError as e:  # the store may be why the job failed: the lease expires by itself
                log.warning("could not release the lease of %s (it expires by itself): %s", self.root.uri, e)

    def record(self, part: PartInfo) -> None:
        """A part is written: a rerun after a crash will find it."""
        with self._lock:
            self.parts.append(part)
        self._write()

    def finish(self) -> None:
        """The version is published (or nothing was to be done): this journal and those taken over go."""
        self._stop.set()
        self._finished = True
        for name in [self.name, *self.taken_over]:
            self.root.delete(name)

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                self._write()
            except StorageError as e:  # tried again at the next renewal; the lease lasts LEASE_S
                log.warning("could not renew the lease of %s: %s", self.root.uri, e)

    def _write(self, expires: float | None = None) -> None:
        with self._lock:
            if self._finished:
                return
            journal = {
                "run": self.run,
                "command": self.command,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": self.started,
                "expires": time.time() + LEASE_S if expires is None else expires,
                "model": self.model,
                "decode": self.decode,
                "parts": [part.to_dict() for part in self.parts],
            }
            self.root.write_bytes(self.name, json.dumps(journal, indent=1).encode())


@contextlib.contextmanager
def maintenance(root: Store, command: str) -> Iterator[None]:
    """The lease on the library at ``root`` for ``command``, one that publishes without embedding: refused
    (:class:`LibraryBusyError`) while a job or another such command holds it; released when the block ends.
    Dead writers' journals stay for the next job, which resumes from them."""
    with Journal(root, "", {}, command, resume=False) as journal:
        try:
            yield
        finally:
            try:
                journal.finish()
            except StorageError as e:  # the command's outcome stands; the lease expires by itself
                log.warning("could not release the lease of %s (it expires by itself): %s", root.uri, e)


def resumable(
    journal: Journal, wanted: list[dict[str, Any]], embedding_dim: int, prompt_shape: tuple[int, int] | None
) -> tuple[list[PartInfo], set[str]]:
    """Of the dead writers' parts, those holding complete rows of ``wanted`` objects (same fingerprint: the
    same content), masked down to those rows, and the uris they cover."""
    if not journal.left:
        return [], set()
    prints = {row["uri"]: fingerprint(row) for row in wanted}
    schema = part_schema(embedding_dim, prompt_shape)
    columns = ["id", "uri", "etag", "size", "mtime", "segment", "duration_s", "error"]
    found: dict[str, dict[int, tuple[int, dict[str, Any]]]] = {}  # uri -> segment -> (part, row): first wins
    for i, part in enumerate(journal.left):
        for row in read_parts(
            journal.root, [part], schema, columns, pc.field("uri").isin(list(prints))
        ).to_pylist():
            if fingerprint(row) == prints[row["uri"]]:
                found.setdefault(row["uri"], {}).setdefault(row["segment"], (i, row))
    segment_s = journal.decode.get("segment_s")
    covered = {uri for uri, rows in found.items() if _complete([row for _, row in rows.values()], segment_s)}
    keep: dict[int, set[int]] = {}
    for uri in covered:
        for i, row in found[uri].values():
            keep.setdefault(i, set()).add(row["id"])
    parts = []
    for i, ids in sorted(keep.items()):
        part = journal.left[i]
        everything = read_parts(journal.root, [part], schema, ["id"])["id"].to_pylist()
        parts.append(part.masked({row_id for row_id in everything if row_id not in ids}))
    return parts, covered


def _complete(rows: list[dict[str, Any]], segment_s: float | None) -> bool:
    """Whether ``rows`` are every segment of an embedded object. An object that failed is tried again: its
    failure may have been the storage's, or what stopped the job."""
    if any(row["error"] is not None for row in rows):
        return False
    expected = len(segments(rows[0]["duration_s"], segment_s)) if segment_s else 1
    return sorted(row["segment"] for row in rows) == list(range(expected))
