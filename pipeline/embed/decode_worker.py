"""A decoder process: ``python -m pipeline.embed.decode_worker IN_FD OUT_FD``, run by
:class:`~pipeline.embed.decoder_processes.DecoderProcesses`.

It reads pickled messages from ``IN_FD`` and answers on ``OUT_FD`` (pipes; its stdout and stderr stay the
job's): first ``(settings, storage_options, max_tries)``, answered ``("ready", None)`` once its
:class:`~pipeline.embed.stages.decode.DecodeVideos` is built (or ``("raised", error)``); then
``(batch, crashes)`` per batch of listed rows, answered ``("ok", decoded batches)`` or ``("raised", error)``.
``crashes`` names the batch's videos that killed a decoder process before, with their counts. It exits when
its input closes.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
from multiprocessing.connection import Connection
from typing import Any

from .stages.decode import DecodeVideos


class CrashCounts:
    """A :class:`DecodeVideos` crash ledger from the counts the job keeps: ``uri`` -> processes it killed."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def begin(self, uri: str) -> int:
        return self.counts.get(uri, 0)

    def end(self, uri: str) -> None:
        """Nothing to record: the job counts the deaths it sees."""


def serve(inbox: Connection, outbox: Connection) -> None:
    """Answer the job's messages until it closes ``inbox``."""
    try:
        settings, storage_options, max_tries = inbox.recv()
        decoder = DecodeVideos(settings, storage_options, max_tries=max_tries)
    except Exception as e:  # noqa: BLE001 - the job raises it (a setting this node cannot honour)
        _answer(outbox, "raised", e)
        return
    _answer(outbox, "ready", None)
    while True:
        try:
            batch, crashes = inbox.recv()
        except EOFError:
            return
        decoder.crash_ledger = CrashCounts(crashes)
        try:
            answer = ("ok", list(decoder(batch)))
        except Exception as e:  # noqa: BLE001 - raised by the job in the batch's place (the store down)
            answer = ("raised", e)
        _answer(outbox, *answer)


def _answer(outbox: Connection, kind: str, value: Any) -> None:
    try:
        outbox.send((kind, value))
    except (pickle.PicklingError, TypeError, AttributeError) as e:  # an error that does not pickle
        outbox.send(("raised", RuntimeError(f"{type(value).__name__}: {value} (unpicklable: {e})")))


def main() -> None:
    inbox = Connection(int(sys.argv[1]), writable=False)
    outbox = Connection(int(sys.argv[2]), readable=False)
    # a job that stops (its Ctrl-C, an error) closes the pipes, and the worker exits quietly
    with contextlib.suppress(BrokenPipeError, EOFError):
        serve(inbox, outbox)


if __name__ == "__main__":
    main()
