"""A bounded, thread-safe memory whose entries expire, for the per-process caches.

An entry lives `ttl()` seconds from when it was stored (read at that moment, so a changed
setting applies to the next entry), and a full cache drops its least recently used entry
instead of forgetting everything. An ordered dict under one lock does it all: requests read
these caches several times each, and cachetools' TLRUCache, which did the same bookkeeping
before, cost about four times as much per read.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    def __init__(
        self,
        *,
        maxsize: int,
        ttl: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._maxsize = maxsize
        self._ttl = ttl
        self._clock = clock
        # key -> (expiry on `clock`, value), least recently used first.
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= now:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: K, value: V) -> None:
        expires = self._clock() + self._ttl()
        with self._lock:
            self._entries[key] = (expires, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._maxsize:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        """Entries still alive (the expired ones are dropped on the way)."""
        now = self._clock()
        with self._lock:
            for key in [key for key, (expires, _) in self._entries.items() if expires <= now]:
                del self._entries[key]
            return len(self._entries)
