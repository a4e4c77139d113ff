"""Per-request fault state, and the Redis connection that fails fast (no Django imports, so the
settings can name the connection class)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class RequestState(threading.local):
    """Per request thread: the round-trip deadline, which dependencies already failed (later
    calls to them fail at once) and which failures are already logged."""

    deadline: float | None = None

    def __init__(self) -> None:
        self.failed: set[str] = set()
        self.logged: set[str] = set()


request_state = RequestState()


try:
    from redis.backoff import NoBackoff
    from redis.connection import Connection as _RedisConnection
    from redis.exceptions import ConnectionError as _RedisConnectionError
    from redis.exceptions import TimeoutError as _RedisTimeoutError
    from redis.retry import Retry
except ImportError:  # pragma: no cover
    # [assignment,misc]: without redis a stand-in base, never instantiated (no Redis to reach).
    _RedisConnection = object  # type: ignore[assignment,misc]


class FailFastRedisConnection(_RedisConnection):
    """A Redis connection (CACHES' connection_class) that does not retry, and that, once Redis
    failed a request, fails that request's further calls at once: a request makes a dozen cache
    calls (credentials, rate limits, quota), and each waiting out REDIS_SOCKET_TIMEOUT against a
    hung Redis would add up to seconds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["retry"] = Retry(NoBackoff(), 0)
        super().__init__(*args, **kwargs)

    def _guarded(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if "cache" in request_state.failed:
            raise _RedisConnectionError("Redis already failed this request.")
        try:
            return call(*args, **kwargs)
        except (_RedisConnectionError, _RedisTimeoutError):
            request_state.failed.add("cache")
            raise

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        return self._guarded(super().connect, *args, **kwargs)

    def send_packed_command(self, *args: Any, **kwargs: Any) -> Any:
        return self._guarded(super().send_packed_command, *args, **kwargs)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        return self._guarded(super().read_response, *args, **kwargs)
