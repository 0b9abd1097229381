"""Calls run on a pool of threads, their results taken in order: the in-process executor's decoders, and the
sub-batches an encoder encodes side by side."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from .ctrl_c import NEVER, CtrlC

T = TypeVar("T")


def in_parallel(
    calls: Iterable[Callable[[], T]], threads: int, depth: int, ctrl_c: CtrlC = NEVER, name: str = "decode"
) -> Iterator[T]:
    """The results of ``calls``, in order, computed by ``threads`` threads at most ``threads + depth`` calls
    ahead of the consumer (decoding releases the GIL in PyAV and Pillow, so the threads decode side by side
    while the consumer encodes). An exception in a call is raised here, in its place, and so is
    ``KeyboardInterrupt`` once ``ctrl_c`` is pressed; a consumer that stops early stops the submissions (the
    calls already running finish). ``name``: the threads' (``videosearch-<name>_<i>``)."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"videosearch-{name}") as pool:
        window: collections.deque[Future[T]] = collections.deque()
        try:
            for call in calls:
                window.append(pool.submit(call))
                if len(window) >= threads + depth:
                    yield ctrl_c.result(window.popleft())
            while window:
                yield ctrl_c.result(window.popleft())
        finally:
            for future in window:
                future.cancel()
