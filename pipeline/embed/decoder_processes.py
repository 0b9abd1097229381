"""Decoding in worker processes: the in-process executor's decoders for jobs large enough to pay their start.

Threads share one interpreter: the Python around PyAV and Pillow (the frame reader's loop, array copies)
holds the GIL for ~20% of a video's decode, which caps two decoding threads at ~1.6x one (measured on the
bench's clips, ``bench/RESULTS.md``). Processes share no GIL. Each worker is a fresh interpreter running
:mod:`~pipeline.embed.decode_worker` (not a fork of the job, whose threads and s3fs event loop do not survive
a fork, and not ``multiprocessing``, which would run the caller's ``__main__`` script again in each worker).
It imports the decode stage only (no torch: ~0.5 s), while the job loads its model and times its stages.

A worker that dies (a crash in native decoder code, the kernel's OOM killer) costs that worker's batch, not
the job: its videos are decoded again one at a time by a new worker, and one that kills its worker
``max_tries`` times becomes an error row ("the decoder crashed on this video N times; not retried"), as on
Ray. A pool given a ``time_limit_s`` (the search service's, for uploaded videos) also kills a worker that
decodes one batch for longer (a crafted file can keep FFmpeg busy forever): a new worker takes its place and
the batch raises :class:`DecodeTimedOut`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from ..storage import StorageOptions
from .ctrl_c import NEVER, CtrlC
from .parallel import in_parallel
from .stages.decode import DecodeSettings

Batch = dict[str, np.ndarray]

STOP_WAIT_S = 5.0  # a worker still running this long after its input closed is killed
_ROOT = str(Path(__file__).resolve().parents[2])  # where the worker finds the pipeline package


class WorkerDied(Exception):
    """A decoder process died (a signal, an error exit) while it decoded."""


class DecodeTimedOut(Exception):
    """A batch took longer than the pool's time limit to decode; its worker was replaced."""


class DecoderProcess:
    """One decoder process (:mod:`~pipeline.embed.decode_worker`), started at once; :meth:`decode` waits for
    it to be ready."""

    def __init__(self, settings: DecodeSettings, storage_options: StorageOptions | None, max_tries: int):
        self.setup = (settings, storage_options, max_tries)
        self._start()

    def _start(self) -> None:
        to_worker, inbox = os.pipe()
        outbox, from_worker = os.pipe()
        path = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))
        env = os.environ | {"PYTHONPATH": path}
        command = [sys.executable, "-m", "pipeline.embed.decode_worker", str(to_worker), str(from_worker)]
        try:
            # its own session: a Ctrl-C reaches the job, which stops it by closing its pipes
            self.process = subprocess.Popen(
                command, pass_fds=(to_worker, from_worker), env=env, start_new_session=True
            )
        finally:
            os.close(to_worker)
            os.close(from_worker)
        self.send = Connection(inbox, readable=False)
        self.receive = Connection(outbox, writable=False)
        self.ready = False
        with contextlib.suppress(OSError):
            self.send.send(self.setup)  # a worker that died at once is found at its first answer

    def decode(self, batch: Batch, crashes: dict[str, int], time_limit_s: float | None = None) -> list[Batch]:
        """``batch`` decoded by this process; :class:`WorkerDied` when it died meanwhile,
        :class:`DecodeTimedOut` when its answer came later than ``time_limit_s`` (this process, if still
        decoding, replaced), and whatever the worker raised (the store down, a setting it cannot honour)
        raised here."""
        if not self.ready:
            self._answer()
            self.ready = True
        sent = time.monotonic()  # before sending: the answer cannot come sooner than the decoding takes
        try:
            self.send.send((batch, crashes))
        except OSError as e:
            raise WorkerDied from e
        if time_limit_s is None:
            return self._answer()
        if self.receive.poll(time_limit_s):
            late = time.monotonic() - sent > time_limit_s  # answered after the limit, as this thread saw it
            answer = self._answer()
            if not late:
                return answer
        else:  # still decoding: stopped
            self.process.kill()
            self.restart()
        raise DecodeTimedOut(f"decoding took longer than {time_limit_s:g} s")

    def _answer(self) -> Any:
        try:
            kind, value = self.receive.recv()
        except (EOFError, OSError) as e:
            code = self.process.wait()
            # it stopped as told, or failed before any video: no video's fault
            if code == 0 or not self.ready:
                what = "stopped" if code == 0 else "failed to start"
                raise RuntimeError(f"a decoder process {what} (exit code {code}; its stderr is above)") from e
            raise WorkerDied(f"exit code {code}") from e
        if kind == "raised":
            raise value
        return value

    def restart(self) -> None:
        """A new process in place of this one (which died)."""
        self.close()
        self._start()

    def close(self) -> None:
        """Close its input (it exits) and reap it."""
        self.send.close()
        self.receive.close()
        try:
            self.process.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class DecoderProcesses:
    """``processes`` decoder processes, started at once: :meth:`decoded` maps them over batches of listed
    rows, in order."""

    def __init__(
        self,
        settings: DecodeSettings,
        storage_options: StorageOptions | None,
        processes: int,
        max_tries: int = 3,
        time_limit_s: float | None = None,
    ) -> None:
        self.setup = (settings, storage_options, max_tries)
        self.processes = processes
        self.time_limit_s = time_limit_s
        self.crashes: dict[str, int] = {}  # uri -> decoder processes it killed
        self._lock = threading.Lock()
        self._closed = False
        self._all = [DecoderProcess(*self.setup) for _ in range(processes)]
        self._idle: queue.SimpleQueue[DecoderProcess] = queue.SimpleQueue()
        for worker in self._all:
            self._idle.put(worker)

    def close(self) -> None:
        self._closed = True
        for worker in self._all:
            worker.close()

    def _stop(self) -> None:
        """Stop every worker now, mid-batch (no batch is restarted after this)."""
        self._closed = True
        for worker in self._all:
            worker.process.kill()

    def __enter__(self) -> DecoderProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def decoded(self, batches: Iterable[Batch], depth: int, ctrl_c: CtrlC = NEVER) -> Iterator[list[Batch]]:
        """Each of ``batches`` decoded (:class:`~pipeline.embed.stages.decode.DecodeVideos`' output
        batches), in order, at most ``processes + depth`` batches ahead of the consumer. An error a worker
        raises (the store down) is raised here in its batch's place, and ``KeyboardInterrupt`` once
        ``ctrl_c`` is pressed; a worker's death is not (see the module)."""
        calls = ((lambda batch=batch: self.decode(batch)) for batch in batches)
        results = in_parallel(calls, self.processes, depth, ctrl_c)
        finished = False
        try:
            # not "yield from": closing this generator would close `results` first, which waits for the
            # batches in flight before the finally below could stop them
            for result in results:  # noqa: UP028
                yield result
            finished = True
        finally:
            if not finished:  # the job stops (Ctrl-C, an error): the batches in flight are not waited for
                self._stop()
            results.close()

    def decode(self, batch: Batch) -> list[Batch]:
        """``batch`` decoded by an idle worker (waiting for one)."""
        worker = self._idle.get()
        try:
            return worker.decode(batch, self._crashes(batch), self.time_limit_s)
        except WorkerDied:
            if self._closed:
                raise
            worker.restart()
            return [out for i in range(len(batch["uri"])) for out in self._alone(worker, batch, i)]
        finally:
            self._idle.put(worker)

    def _alone(self, worker: DecoderProcess, batch: Batch, i: int) -> list[Batch]:
        """Video ``i`` of ``batch`` decoded on its own (``worker`` restarted whenever it dies): one whose
        decoding kills the worker is counted each time, until the worker makes it an error row."""
        video = {name: column[i : i + 1] for name, column in batch.items()}
        while True:
            try:
                return worker.decode(video, self._crashes(video), self.time_limit_s)
            except WorkerDied:
                uri = str(video["uri"][0])
                with self._lock:
                    self.crashes[uri] = self.crashes.get(uri, 0) + 1
                worker.restart()

    def _crashes(self, batch: Batch) -> dict[str, int]:
        with self._lock:
            return {str(uri): self.crashes[str(uri)] for uri in batch["uri"] if str(uri) in self.crashes}
