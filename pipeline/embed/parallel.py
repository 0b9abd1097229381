"""Calls run on a pool of threads, their results taken in order: the in-process executor's decoders."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def in_parallel(calls: Iterable[Callable[[], T]], threads: int, depth: int) -> Iterator[T]:
    """The results of ``calls``, in order, computed by ``threads`` threads at most ``threads + depth`` calls
    ahead of the consumer (decoding releases the GIL in PyAV and Pillow, so the threads decode side by side
    while the consumer encodes). An exception in a call is raised here, in its place; a consumer that stops
    early stops the submissions (the calls already running finish)."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="videosearch-decode") as pool:
        window: collections.deque[Future[T]] = collections.deque()
        try:
            for call in calls:
                window.append(pool.submit(call))
                if len(window) >= threads + depth:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()
