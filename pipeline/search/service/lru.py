"""A small thread-safe least-recently-used map."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """At most ``size`` entries, and with ``weigh``, entries that weigh at most ``budget`` together (one that
    weighs more is not kept); the least recently used goes first. The lock guards the map only, never the
    making of a value, so that callers never wait on one another's work (two may make the same value)."""

    def __init__(self, size: int, weigh: Callable[[V], int] | None = None, budget: int = 0) -> None:
        self.size, self.weigh, self.budget = size, weigh, budget
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self._weights: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        """The value under ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key]

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value`` under ``key``, dropping the least recently used entries past the size or budget."""
        weight = self.weigh(value) if self.weigh else 0
        with self._lock:
            self._entries[key], self._weights[key] = value, weight
            self._entries.move_to_end(key)
            while len(self._entries) > self.size or (
                self.weigh and sum(self._weights.values()) > self.budget
            ):
                dropped, _ = self._entries.popitem(last=False)
                del self._weights[dropped]

    def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value under ``key``, made by ``make()`` (outside the lock) and stored when absent."""
        value = self.get(key)
        if value is None:
            value = make()
            self.put(key, value)
        return value
