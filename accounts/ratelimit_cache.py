"""The rate limits' cache (RATELIMIT_USE_CACHE): a request counted in one Redis round trip.

django-ratelimit counts a request with `add(key, 1, timeout)` and, when the window's counter is
there already (for every request but the window's first), `incr(key)`: two round trips, and
the second one a Lua script in django-redis. Each window has a key of its own (its end second is
part of the key), so once this process has seen a window's counter, `add` answers "it exists"
without asking Redis until the counter's timeout has passed. `incr` then adds in one write,
with no script (SET NX EX + INCRBY), which also creates the counter with that timeout should it
be gone after all (Redis restarted, or evicted it): a lost counter counts again from 1, as a new
window does.

The tokens-per-minute window adds its tokens the same way (`add_to_counter`), in the same write
as the request's own count when it can (`riding`): one round trip for both windows.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django_prometheus.cache.backends.redis import RedisCache
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Counters seen to exist, process-wide (Django builds a cache backend per thread): full key ->
# (monotonic deadline, the timeout the counter was made with, in seconds).
_seen: dict[str, tuple[float, int]] = {}
_seen_lock = threading.Lock()
# Past this many remembered counters, the expired ones are forgotten (one per tenant and window).
_SEEN_PRUNE_AT = 10_000


# A kept connection idle for longer than this is checked before use, as the pool checks each
# connection it hands out: the server may have closed it meanwhile (Redis' `timeout`, a proxy).
IDLE_CHECK_SECONDS = 1.0


class _KeptConnection(threading.local):
    pool: Any = None
    connection: Any = None
    last_used = 0.0


_kept = _KeptConnection()


def _connection_of(redis: Any) -> Any:
    """This thread's own connection to `redis` for the counters, made with its pool's settings
    and kept (it closes with the thread). A checkout from the pool probes the connection for
    unread replies every time (a few system calls, about a third of a counter's cost); this one
    never has any, because every reply is read or the connection is closed (it reconnects on
    its next command). Only after a pause is it probed, for a close by the server."""
    pool = redis.connection_pool
    if _kept.pool is not pool:
        # RESP2, whatever the pool speaks (redis-py 8 defaults to RESP3): no push frame, such as
        # RESP3's maintenance notifications, can come between the replies, which are then one
        # line each (FailFastRedisConnection.exchange_lines).
        resp2 = {**pool.connection_kwargs, "protocol": 2, "maint_notifications_config": None}
        _kept.pool, _kept.connection = pool, pool.connection_class(**resp2)
    connection = _kept.connection
    now = time.monotonic()
    if now - _kept.last_used > IDLE_CHECK_SECONDS and connection.is_connected:
        try:
            if connection.can_read():  # nothing is due: this is an end of file, or stray data
                connection.disconnect()
        except (RedisConnectionError, RedisTimeoutError, OSError):
            connection.disconnect()
    _kept.last_used = now
    return connection


def redis_of(cache: Any) -> Any | None:
    """The redis-py client behind a django-redis cache; None for other caches."""
    client = getattr(cache, "client", None)
    get_client = getattr(client, "get_client", None)
    return get_client(write=True) if callable(get_client) else None


Counter = tuple[str, int, int]  # full key, amount, timeout in seconds


def add_to_counter(redis: Any, full_key: str, amount: int, *, timeout: int) -> int:
    """Adds `amount` to a counter, creating it with `timeout` seconds to live if it is not there
    (INCRBY keeps the expiry); the count after. One round trip, no script. django-redis stores
    integers as plain numbers, so the cache's get, incr and decr read and change the same value."""
    return add_to_counters(redis, [(full_key, amount, timeout)])[0]


def add_to_counters(redis: Any, counters: list[Counter]) -> list[int]:
    """`add_to_counter` for each of `counters`, all in one round trip; their counts after.
    The commands go out in one write on a kept connection, rather than through
    `redis.pipeline()`, whose own cost is about a third of the call."""
    connection = _connection_of(redis)
    payload = b"".join(
        _counter_commands(key.encode(), amount, timeout) for key, amount, timeout in counters
    )
    try:
        exchange_lines = getattr(connection, "exchange_lines", None)
        if exchange_lines is None:  # a connection class configured otherwise
            connection.send_packed_command([payload])
            counts = []
            for _ in counters:
                connection.read_response()
                counts.append(int(connection.read_response()))
            return counts
        replies = exchange_lines(payload, 2 * len(counters))
        counts = []
        for created, count in zip(replies[::2], replies[1::2], strict=True):
            if created not in _SET_NX_REPLIES or not count.startswith(b":"):
                raise RedisConnectionError("Redis answered a counter with something unexpected.")
            counts.append(int(count[1:]))
        return counts
    except BaseException:
        connection.disconnect()  # a reply may still be on its way: never read it as the next one
        raise


class Rider:
    """A counter that goes to Redis with the next request count of this thread (`riding`)."""

    __slots__ = ("amount", "count", "full_key", "timeout")

    def __init__(self, full_key: str, amount: int, timeout: int) -> None:
        self.full_key = full_key
        self.amount = amount
        self.timeout = timeout
        # The counter's count after the ride; None while it has not ridden (the cache counted
        # the request otherwise: the window's first request, a cache that is not Redis).
        self.count: int | None = None


class _Riding(threading.local):
    rider: Rider | None = None


_riding = _Riding()


@contextmanager
def riding(full_key: str, amount: int, *, timeout: int) -> Iterator[Rider]:
    """Adds `amount` to the counter `full_key` in the same round trip as the request count that
    django-ratelimit makes in this block (through `RateLimitCache.incr`), if it makes one."""
    rider = _riding.rider = Rider(full_key, amount, timeout)
    try:
        yield rider
    finally:
        _riding.rider = None


# SET ... NX answers OK (the counter was created) or a null (it was there), in RESP2.
_SET_NX_REPLIES = frozenset({b"+OK", b"$-1"})


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _counter_commands(key: bytes, amount: int, timeout: int) -> bytes:
    """SET key 0 EX timeout NX, then INCRBY key amount, in Redis' wire format (RESP): written
    here because redis-py's general packer costs more than the rest of the call's Python."""
    bulk_key = _bulk(key)
    return b"".join(
        (
            b"*6\r\n$3\r\nSET\r\n",
            bulk_key,
            b"$1\r\n0\r\n$2\r\nEX\r\n",
            _bulk(b"%d" % timeout),
            b"$2\r\nNX\r\n*3\r\n$6\r\nINCRBY\r\n",
            bulk_key,
            _bulk(b"%d" % amount),
        )
    )


def _remember(full_key: str, timeout: int) -> None:
    now = time.monotonic()
    with _seen_lock:
        if len(_seen) >= _SEEN_PRUNE_AT:
            for stale in [key for key, (deadline, _) in _seen.items() if deadline <= now]:
                del _seen[stale]
        _seen[full_key] = (now + timeout, timeout)


class RateLimitCache(RedisCache):
    def add(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        client: Any = None,
    ) -> bool:
        full_key = str(self.make_key(key, version=version))
        seen = _seen.get(full_key)
        if seen is not None and seen[0] > time.monotonic():
            return False
        added = bool(super().add(key, value, timeout=timeout, version=version, client=client))
        if isinstance(timeout, int | float) and timeout > 0:
            _remember(full_key, math.ceil(timeout))
        return added

    def incr(
        self,
        key: Any,
        delta: int = 1,
        version: int | None = None,
        client: Any = None,
        ignore_key_check: bool = False,
    ) -> int:
        full_key = str(self.make_key(key, version=version))
        seen = _seen.get(full_key)
        if seen is None:  # not a counter `add` made or saw: django-redis's own incr
            return int(
                super().incr(
                    key,
                    delta=delta,
                    version=version,
                    client=client,
                    ignore_key_check=ignore_key_check,
                )
            )
        rider = _riding.rider
        if rider is None or rider.count is not None:
            return add_to_counter(redis_of(self), full_key, delta, timeout=seen[1])
        count, rider.count = add_to_counters(
            redis_of(self),
            [(full_key, delta, seen[1]), (rider.full_key, rider.amount, rider.timeout)],
        )
        return count
