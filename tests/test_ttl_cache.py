"""The per-process caches' memory (embedplatform/ttl_cache.py): entries expire `ttl()` seconds
after they were stored, and a full cache drops its least recently used entry."""

from __future__ import annotations

import threading
from typing import Any

from embedplatform.ttl_cache import TtlCache


class Clock:
    """The cache's clock, and the ttl setting it reads at each store; tests move both."""

    def __init__(self, ttl: float = 60.0) -> None:
        self.now = 1000.0
        self.ttl = ttl

    def __call__(self) -> float:
        return self.now


def cache_on(clock: Clock, *, maxsize: int = 8) -> TtlCache[Any, int]:
    return TtlCache(maxsize=maxsize, ttl=lambda: clock.ttl, clock=clock)


def test_it_forgets_an_entry_ttl_seconds_after_it_was_stored() -> None:
    clock = Clock(ttl=10.0)
    cache = cache_on(clock)
    cache.put("a", 1)
    clock.now += 9.9
    assert cache.get("a") == 1  # a read does not extend its life
    clock.now += 0.1
    assert cache.get("a") is None
    assert len(cache) == 0


def test_it_reads_the_ttl_when_each_entry_is_stored() -> None:
    clock = Clock(ttl=10.0)
    cache = cache_on(clock)
    cache.put("long", 1)
    clock.ttl = 1.0
    cache.put("short", 2)
    clock.now += 5
    assert (cache.get("long"), cache.get("short")) == (1, None)


def test_it_drops_the_least_recently_used_entry_when_full() -> None:
    cache = cache_on(Clock(), maxsize=3)
    for number, key in enumerate("abc"):
        cache.put(key, number)
    assert cache.get("a") == 0  # now the most recently used
    cache.put("b", 10)  # so is b, stored again
    cache.put("d", 3)
    assert [cache.get(key) for key in "abcd"] == [0, 10, None, 3]
    assert len(cache) == 3


def test_it_drops_expired_entries_before_live_ones_when_full() -> None:
    clock = Clock(ttl=5.0)
    cache = cache_on(clock, maxsize=3)
    cache.put("short-lived", 0)
    clock.ttl = 60.0
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("short-lived") == 0  # the most recently used, but about to expire
    clock.now += 10
    cache.put("c", 3)
    assert [cache.get(key) for key in ("a", "b", "c")] == [1, 2, 3]


def test_it_stores_nothing_with_a_ttl_of_zero() -> None:
    clock = Clock()
    cache = cache_on(clock, maxsize=3)
    cache.put("a", 1)
    clock.ttl = 0.0  # as AUTH_CACHE_SECONDS=0 switches the credential cache off
    cache.put("a", 2)
    cache.put("b", 3)
    assert (cache.get("a"), cache.get("b"), len(cache)) == (None, None, 0)


def test_it_counts_only_live_entries_and_clears() -> None:
    clock = Clock(ttl=10.0)
    cache = cache_on(clock, maxsize=100)
    for key in range(5):
        cache.put(key, key)
        clock.now += 3
    assert len(cache) == 3  # stored at +0 and +3 are gone at +15
    cache.clear()
    assert len(cache) == 0
    assert cache.get(4) is None


def test_it_stays_within_its_bound_under_concurrent_writers() -> None:
    cache: TtlCache[tuple[int, int], int] = TtlCache(maxsize=50, ttl=lambda: 60.0)

    def write(thread: int) -> None:
        for number in range(2000):
            cache.put((thread, number), number)
            cache.get((thread, number - 1))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) == 50
