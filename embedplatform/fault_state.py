"""Per-request fault state, and the Redis connection that fails fast (no Django imports, so the
settings can name the connection class)."""

from __future__ import annotations

import socket
import ssl
import struct
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
    from redis.connection import SSLConnection as _RedisSSLConnection
    from redis.exceptions import ConnectionError as _RedisConnectionError
    from redis.exceptions import TimeoutError as _RedisTimeoutError
    from redis.retry import Retry
except ImportError:  # pragma: no cover
    # [assignment,misc]: without redis a stand-in base, never instantiated (no Redis to reach).
    _RedisConnection = object  # type: ignore[assignment,misc]
    _RedisSSLConnection = object  # type: ignore[assignment,misc]


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

    def exchange_lines(self, payload: bytes, count: int) -> list[bytes]:
        """Sends `payload` (commands in Redis' wire format) and returns the next `count`
        replies, each known to be one line (a status, an integer, a null or an error: what SET
        NX and INCRBY answer), without their type byte's meaning applied. Read straight from
        the socket: redis-py's general reader costs several times the rest of a rate-limit
        count, and the caller never leaves a reply unread on this connection
        (accounts/ratelimit_cache.py), so no reader holds buffered data for it."""
        return list(self._guarded(self._exchange_lines, payload, count))

    def _exchange_lines(self, payload: bytes, count: int) -> list[bytes]:
        if self._sock is None:
            self.connect()
        sock = self._sock
        if sock is None:
            raise _RedisConnectionError("Not connected to Redis.")
        if sock.gettimeout() is not None and not isinstance(sock, ssl.SSLSocket):
            _use_kernel_timeouts(sock, self.socket_timeout)
        data = b""
        try:
            sock.sendall(payload)
            while data.count(b"\r\n") < count:
                chunk = sock.recv(4096)
                if not chunk:
                    raise _RedisConnectionError("Connection closed by server.")
                data += chunk
        # The socket's timeout (REDIS_SOCKET_TIMEOUT): Python's, or the kernel's (EAGAIN).
        except (TimeoutError, BlockingIOError) as exc:
            raise _RedisTimeoutError("Timeout talking to Redis.") from exc
        except OSError as exc:
            raise _RedisConnectionError(f"Error while talking to Redis: {exc}") from exc
        *lines, rest = data.split(b"\r\n")
        if rest or len(lines) != count:
            raise _RedisConnectionError("Redis sent more than the replies awaited.")
        for line in lines:
            if line.startswith(b"-"):
                # As redis-py's reader maps them: LOADING, for one, is a connection error.
                error: Exception = self._parser.parse_error(line[1:].decode(errors="replace"))
                raise error
        return lines


def _use_kernel_timeouts(sock: socket.socket, seconds: float | None) -> None:
    """Makes a plain TCP socket blocking, bounded by the kernel's send and receive timeouts
    instead of Python's. With Python's, each send and each receive is a poll() and then the
    call, and each of the two lets the GIL go: among busy request threads, taking it back
    costs more than the call. redis-py restores Python's timeout when it uses the socket
    itself (its health check); the next exchange comes back here."""
    if seconds is None or seconds < 0.001:  # a zero timeval would mean no timeout at all
        return
    sock.settimeout(None)
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class FailFastSSLRedisConnection(FailFastRedisConnection, _RedisSSLConnection):
    """The same over TLS, for rediss:// URLs: redis-py lets a configured connection class win
    over the URL's scheme, so a plain one would speak unencrypted TCP to a TLS port."""


def connection_class_for(url: str) -> type[FailFastRedisConnection]:
    """The fail-fast connection class that speaks the URL's scheme (CACHES' connection_class)."""
    if url.lower().startswith("rediss://"):
        return FailFastSSLRedisConnection
    return FailFastRedisConnection
