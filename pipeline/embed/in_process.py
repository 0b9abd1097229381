"""The embed stages in the job's own process: a small change set without Ray's start-up.

A local Ray costs ~12 s before its first video on a laptop (its services, then each actor's imports and model
load), more than a refresh that adds a few dozen videos spends on them. So when the job runs on this machine
(no cluster to join) and the objects to embed are few (``IN_PROCESS_MAX_OBJECTS`` and ``IN_PROCESS_MAX_BYTES``
in :mod:`pipeline.embed.options`), the same stage callables run here in a plain loop: decode -> encode ->
write (decoding a few batches ahead in a thread, so that it overlaps encoding), one part per
:data:`~pipeline.embed.stages.write.PART_ROWS` rows, each part recorded in the journal as soon as it is
written, exactly as the Ray plan does. ``--executor ray`` or ``in-process`` overrides the choice.

What Ray gives that a loop does not: a crash in native decoder code ends this process, where on Ray it costs
one actor (and its crash ledger fails the video after a few tries). Here an :class:`InFlightMarker` names the
video being decoded; a job for the same library that finds a marker left behind by a dead process runs on
Ray, where that video is tried a bounded number of times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..library import LibraryWriter, PartInfo
from ..library.journal import Journal
from ..models import VideoTextModel
from .options import IN_PROCESS_MAX_BYTES, IN_PROCESS_MAX_OBJECTS, EmbedOptions
from .stages.decode import DecodeSettings, DecodeVideos
from .stages.encode import EncodeFrames
from .stages.write import PART_ROWS, WritePart, written_part

log = logging.getLogger(__name__)

PLACEMENT = "this process"  # the summary's node name for the stages run here
DECODED_AHEAD = 2  # decoded batches that may wait for the encoder (each at most 16 x 8 frames at 224 px)

T = TypeVar("T")


class InFlightMarker:
    """A file that names the video this process is decoding for ``library``, removed when it is done.

    It lives in the machine's temporary directory (the in-process executor only runs on the job's own
    machine), keyed by the library's URI. ``begin``/``end`` are :class:`DecodeVideos`' crash ledger: a video
    begun again after a crash gets the count of crashed tries, so that a run forced in-process fails it after
    ``max_tries`` instead of crashing forever."""

    def __init__(self, library: str) -> None:
        key = hashlib.blake2b(library.encode(), digest_size=10).hexdigest()
        self.path = Path(tempfile.gettempdir()) / "videosearch" / f"in-flight-{key}.json"

    def left_behind(self) -> str | None:
        """The video a dead process was decoding for this library, if one was."""
        try:
            marker = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return None if _alive(marker.get("pid")) else str(marker.get("uri"))

    def begin(self, uri: str) -> int:
        """Mark ``uri`` as being decoded; the number of earlier tries that died decoding it."""
        try:
            marker = json.loads(self.path.read_text())
            tries = int(marker["tries"]) if marker.get("uri") == uri and not _alive(marker.get("pid")) else 0
        except (OSError, ValueError, KeyError):
            tries = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"uri": uri, "tries": tries + 1, "pid": os.getpid()}))
        return tries

    def end(self, uri: str) -> None:
        """``uri`` is decoded (or became an error row): no longer in flight."""
        self.clear()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


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


def runs_in_process(listed: list[dict[str, Any]], options: EmbedOptions, library: str) -> bool:
    """Whether the job embeds ``listed`` here (:func:`embed_in_process`) rather than on Ray.

    ``--executor auto`` runs here when there is no cluster to join (no ``--address``, no ``RAY_ADDRESS``, or
    either is ``local``, and no Ray connected in this process), no actor counts were asked for, ``listed`` is
    at most ``IN_PROCESS_MAX_OBJECTS`` objects of ``IN_PROCESS_MAX_BYTES``, and no earlier in-process job of
    ``library`` died while decoding."""
    if options.executor != "auto":
        return options.executor == "in-process"
    address = options.address or os.environ.get("RAY_ADDRESS") or "local"
    if address != "local" or options.decoders or options.encoders or _ray_connected():
        return False
    size = sum(int(row.get("size") or 0) for row in listed)
    if len(listed) > IN_PROCESS_MAX_OBJECTS or size > IN_PROCESS_MAX_BYTES:
        return False
    crashed = InFlightMarker(library).left_behind()
    if crashed is not None:
        log.warning("a job died decoding %s: this one runs on Ray, where a crash costs an actor", crashed)
    return crashed is None


def _ray_connected() -> bool:
    """Whether this process already joined a Ray cluster (without importing Ray when it has not)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def embed_in_process(
    listed: list[dict[str, Any]],
    settings: DecodeSettings,
    options: EmbedOptions,
    writer: LibraryWriter,
    model: VideoTextModel,
    journal: Journal,
) -> tuple[list[PartInfo], dict[str, dict[str, int]]]:
    """Decode, encode and write ``listed`` in this process: the new parts, each recorded in ``journal`` as
    soon as it is written, and the placement (every stage in :data:`PLACEMENT`)."""
    marker = InFlightMarker(writer.store.uri)
    decode = DecodeVideos(settings, options.storage, crash_ledger=marker)
    device = "cpu" if options.gpus_per_encoder == 0 else "auto"
    encode = EncodeFrames(options.model, options.storage, device, options.batch_size, loaded=model)
    write = WritePart(writer.store, writer.embedding_dim, writer.prompt_shape)

    def decoded() -> Iterator[dict[str, np.ndarray]]:  # a batch of rows per encoder call (or per long video)
        for start in range(0, len(listed), options.batch_size):
            group = listed[start : start + options.batch_size]
            yield from decode(
                {name: np.array([row[name] for row in group], dtype=object) for name in group[0]}
            )

    pending: list[dict[str, np.ndarray]] = []
    for frames in ahead(decoded(), DECODED_AHEAD):
        pending.append(encode(frames))
        while sum(len(b["uri"]) for b in pending) >= PART_ROWS:
            part, pending = _split(pending, PART_ROWS)
            journal.record(_written(write, part))
    if pending and sum(len(b["uri"]) for b in pending):
        journal.record(_written(write, _concat(pending)))
    marker.clear()
    return journal.parts, {"decode": {PLACEMENT: 1}, "encode": {PLACEMENT: 1}}


def ahead(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items``, produced by a thread that runs at most ``depth`` items ahead of the consumer: decoding
    (PyAV) and encoding (torch) release the GIL, so the next videos decode while the model encodes. An
    exception in the producer is raised here, in order; a consumer that stops early stops the producer."""
    slots: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put((kind, value), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("done", None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put("error", e)

    producer = threading.Thread(target=produce, name="videosearch-decode", daemon=True)
    producer.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "error":
                raise value
            if kind == "done":
                return
            yield value
    finally:
        stop.set()
        producer.join()


def _written(write: WritePart, rows: dict[str, np.ndarray]) -> PartInfo:
    described = write(rows)
    return written_part({name: column[0] for name, column in described.items()})


def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def _split(batches: list[dict[str, np.ndarray]], rows: int) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The first ``rows`` rows of ``batches`` as one batch, and the rest."""
    whole = _concat(batches)
    rest = {name: column[rows:] for name, column in whole.items()}
    return {name: column[:rows] for name, column in whole.items()}, [rest]
