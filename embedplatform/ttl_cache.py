"""A bounded, thread-safe memory whose entries expire, for the per-process caches.

cachetools' TLRUCache does the bookkeeping: an entry lives `ttl()` seconds from when it was
stored (read at that moment, so a changed setting applies to the next entry), and a full cache
drops its least recently used entry instead of forgetting everything. cachetools' caches are not
thread-safe, hence the lock; gthread workers serve many requests at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from cachetools import TLRUCache

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
        self._ttl = ttl
        self._entries: TLRUCache[K, V, float] = TLRUCache(maxsize, self._expires, timer=clock)
        self._lock = threading.Lock()

    def _expires(self, _key: K, _value: V, now: float) -> float:
        return now + self._ttl()

    def get(self, key: K) -> V | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._entries[key] = value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            self._entries.expire()
            return len(self._entries)
