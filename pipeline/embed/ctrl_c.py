"""Ctrl-C during an in-process job, taken where the job can stop cleanly.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives. Inside the lock code of a
future's ``result()`` (``threading.Condition``) it can land between acquiring and releasing, and the job ends
with ``RuntimeError: cannot release un-acquired lock`` instead of its word on Ctrl-C (seen in CI). Within
:func:`deferred`, the first Ctrl-C only sets a flag; the job's waits look at it (:meth:`CtrlC.check` between
steps, :meth:`CtrlC.result` every :data:`POLL_S` while it waits for a decoded batch) and raise
``KeyboardInterrupt`` there. A second Ctrl-C raises at once, wherever the main thread is, as before.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from types import FrameType
from typing import TypeVar

T = TypeVar("T")

POLL_S = 0.1  # how often a wait for a decoded batch looks for a Ctrl-C


class CtrlC:
    """Whether Ctrl-C was pressed within :func:`deferred` (never, for one made outside it)."""

    def __init__(self) -> None:
        self._pressed = threading.Event()

    def press(self) -> None:
        """Take a Ctrl-C: the first is kept for :meth:`check`, a second raises ``KeyboardInterrupt`` here."""
        self.check()
        self._pressed.set()

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed."""
        if self._pressed.is_set():
            raise KeyboardInterrupt

    def result(self, future: Future[T]) -> T:
        """``future``'s result, waited for; ``KeyboardInterrupt`` as soon as Ctrl-C is pressed meanwhile."""
        while True:
            self.check()
            try:
                return future.result(timeout=POLL_S)
            except FutureTimeout:
                continue


NEVER = CtrlC()  # for waits outside deferred: nothing presses it


@contextlib.contextmanager
def deferred() -> Iterator[CtrlC]:
    """Within: the first Ctrl-C presses the yielded :class:`CtrlC`, a second raises ``KeyboardInterrupt``
    at once. Off the main thread, or where SIGINT has a handler of the caller's, nothing changes (signal
    handlers belong to the main thread) and the yielded one is never pressed."""
    ctrl_c = CtrlC()
    on_main = threading.current_thread() is threading.main_thread()
    if not on_main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield ctrl_c
        return

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        ctrl_c.press()

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield ctrl_c
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
