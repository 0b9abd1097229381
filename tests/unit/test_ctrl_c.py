"""Ctrl-C during an in-process job is taken where the job waits, not wherever the main thread is."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest

from pipeline.embed.ctrl_c import POLL_S, deferred
from pipeline.embed.parallel import in_parallel


@pytest.fixture(autouse=True)
def python_takes_ctrl_c() -> Iterator[None]:
    """SIGINT as a fresh interpreter has it: earlier tests of the session (Ray's drivers) install their own
    handlers, and :func:`deferred` leaves a caller's handler alone."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs in the main thread at its next bytecode


def test_the_first_ctrl_c_is_kept_for_the_next_check_and_a_second_stops_at_once() -> None:
    with deferred() as ctrl_c:
        _ctrl_c()  # not raised here
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()
        with pytest.raises(KeyboardInterrupt):
            _ctrl_c()  # the impatient user's second press
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        _ctrl_c()  # outside, as ever


def test_a_wait_for_a_result_that_never_comes_ends_soon_after_ctrl_c() -> None:
    never: Future[int] = Future()
    threading.Timer(10, never.set_result, (0,)).start()  # should the wait miss the Ctrl-C: a failure, no hang
    with deferred() as ctrl_c:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.result(never)
        assert time.monotonic() - started < 0.2 + 10 * POLL_S


def test_decoding_in_parallel_stops_in_place_of_the_next_result_and_the_calls_running_finish() -> None:
    finished: list[int] = []
    release = threading.Event()

    def call(i: int) -> int:
        if i == 1:
            release.wait(10)  # a long decode
        finished.append(i)
        return i

    seen = []
    with deferred() as ctrl_c:
        results = in_parallel(((lambda i=i: call(i)) for i in range(100)), 2, 0, ctrl_c)
        seen.append(next(results))
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        threading.Timer(0.6, release.set).start()
        with pytest.raises(KeyboardInterrupt):
            seen.append(next(results))
        results.close()  # waits for the call running
    assert seen == [0]
    assert 1 in finished and len(finished) < 100  # the submissions stopped


def test_a_handler_of_the_callers_is_left_alone() -> None:
    taken = []
    signal.signal(signal.SIGINT, lambda signum, frame: taken.append(signum))
    with deferred() as ctrl_c:
        _ctrl_c()
        ctrl_c.check()  # not pressed: the caller's handler took it
    assert taken == [signal.SIGINT]


def test_off_the_main_thread_nothing_changes() -> None:
    handlers = []

    def job() -> None:
        with deferred() as ctrl_c:
            handlers.append(signal.getsignal(signal.SIGINT))
            ctrl_c.check()

    worker = threading.Thread(target=job)
    worker.start()
    worker.join()
    assert handlers == [signal.default_int_handler]
