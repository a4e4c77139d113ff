"""Faults of the request body, the database and Redis, as fast clear answers.

- A body the client breaks (malformed or truncated chunked encoding, a connection closed early)
  is a 400 `malformed_body` on every path (embedplatform.wsgi raises MalformedBody wherever the
  body is read).
- PostgreSQL refusing or failing (`OperationalError`, `InterfaceError`) is a 503
  `database_unavailable`; Redis refusing or timing out a 503 `cache_unavailable`; both with
  Retry-After and one log line carrying the request id, never a traceback.
- A PostgreSQL that accepts connections but never answers cannot hold a request: every round
  trip on a connection is bounded by a watchdog that shuts the socket down when its deadline
  passes (the server's statement_timeout cannot help when the server itself is stuck), and
  /health gives the database a budget of HEALTH_DATABASE_BUDGET_SECONDS in all.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from django.core.exceptions import BadRequest
from django.db.utils import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from embedplatform.errors import (
    INVALID_REQUEST,
    ApiError,
    ServiceUnavailable,
    api_error_response,
)
from embedplatform.errors import exception_handler as api_exception_handler
from embedplatform.errors import server_error as plain_server_error
from embedplatform.fault_state import request_state as _request_state
from embedplatform.shutdown import SHUTDOWN_MARGIN_SECONDS, seconds_left, stopping

logger = logging.getLogger("embedplatform.faults")

# What a client is told to wait: long enough for a restarted PostgreSQL or Redis to come back,
# short enough that a blip costs little.
RETRY_AFTER_SECONDS = 5
# The part of /health's ~2 s answer the database may use (the rest: Redis, the response).
HEALTH_DATABASE_BUDGET_SECONDS = 1.5
HEALTH_PATH = "/health"


def database_failed_in_this_request() -> bool:
    """Once PostgreSQL failed a request, its further queries (the refusal's usage row, say)
    fail at once rather than each waiting out a connect or round-trip timeout again."""
    return "database" in _request_state.failed


class MalformedBody(BadRequest):
    """The client broke the request body; raised by the WSGI edge wherever the body is read."""


def malformed_body() -> ApiError:
    return ApiError(
        "The request body could not be read: its chunked encoding is malformed or it ended "
        "before its declared length.",
        status_code=400,
        code="malformed_body",
        error_type=INVALID_REQUEST,
    )


def _redis_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = []
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        found += [RedisConnectionError, RedisTimeoutError]
    except ImportError:  # pragma: no cover
        pass
    try:
        from django_redis.exceptions import ConnectionInterrupted

        found.append(ConnectionInterrupted)
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)


DATABASE_ERRORS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError)
CACHE_ERRORS = _redis_errors()


def dependency_of(exc: BaseException) -> str | None:
    """ "database", "cache", or None when exc is no dependency failure."""
    if isinstance(exc, DATABASE_ERRORS):
        return "database"
    if CACHE_ERRORS and isinstance(exc, CACHE_ERRORS):
        return "cache"
    return None


def dependency_unavailable(dependency: str) -> ServiceUnavailable:
    name = "database" if dependency == "database" else "cache (Redis)"
    return ServiceUnavailable(
        f"The {name} is unavailable; try again shortly.",
        code=f"{dependency}_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def log_fault(dependency: str, exc: BaseException, request: Any = None) -> None:
    """One line per failed request: what failed and which request, no traceback."""
    _request_state.failed.add(dependency)
    if dependency in _request_state.logged:
        return  # already said for this request (say, by the view, then by its refusal log)
    _request_state.logged.add(dependency)
    request = getattr(request, "_request", request)  # a DRF Request wraps Django's
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    logger.warning(
        f"{dependency}_unavailable",
        extra={
            "request_id": getattr(request, "request_id", ""),
            "path": getattr(request, "path", ""),
            "error": f"{type(exc).__name__}: {first_line}",
        },
    )


def exception_handler(exc: Exception, context: dict[str, Any]) -> Any:
    """DRF's EXCEPTION_HANDLER: the project's, with dependency failures made 503s first."""
    if isinstance(exc, MalformedBody):
        exc = malformed_body()
    dependency = dependency_of(exc)
    if dependency is not None:
        log_fault(dependency, exc, context.get("request"))
        exc = dependency_unavailable(dependency)
    response = api_exception_handler(exc, context)
    if response.status_code == 503 and "Retry-After" not in response:
        # Every 503 says when to come back (model overloaded, worker stopping, ...).
        response["Retry-After"] = "1" if stopping() else str(RETRY_AFTER_SECONDS)
    return response


def fault_response(exc: BaseException, request: HttpRequest | None) -> HttpResponse | None:
    """The answer for a fault raised outside a DRF view, or None when exc is no fault of ours."""
    if isinstance(exc, MalformedBody):
        return api_error_response(malformed_body())
    dependency = dependency_of(exc)
    if dependency is None:
        return None
    log_fault(dependency, exc, request)
    return api_error_response(dependency_unavailable(dependency))


def server_error(request: HttpRequest) -> HttpResponse:
    """handler500: Django calls it inside its `except`, so the exception is still at hand; a
    dependency failure raised by a middleware (sessions, say) becomes its 503 there."""
    exc = sys.exc_info()[1]
    if exc is not None:
        response = fault_response(exc, request)
        if response is not None:
            return response
    return plain_server_error(request)


class QuietFaultsFilter(logging.Filter):
    """A database or Redis failure is logged once, in one line, by log_fault: Django's own lines
    for it (and for any deliberate 503) go, and any other logger's keeps its message but loses
    the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "django.request" and getattr(record, "status_code", None) == 503:
            return False  # a deliberate 503: its cause has its own line, the access log the rest
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or (dependency_of(exc) is None and not isinstance(exc, MalformedBody)):
            return True
        if record.name == "django.request":
            return False
        record.exc_info = None
        record.exc_text = None
        return True


def shutting_down() -> ServiceUnavailable:
    return ServiceUnavailable(
        "This server is shutting down; retry and another will answer.",
        code="shutting_down",
        headers={"Retry-After": "1"},
    )


class StoppingThrottle(BaseThrottle):
    """Refuses a request that starts too close to its stopping worker's deadline to be served.
    A throttle runs after authentication, so a refused embed request is logged like any other
    refusal (a usage row, no tokens)."""

    def allow_request(self, request: Request, view: Any) -> bool:
        left = seconds_left()
        if left is not None and left < SHUTDOWN_MARGIN_SECONDS * 2:
            raise shutting_down()
        return True


class FaultMiddleware:
    """Dependency failures and broken bodies in plain Django views (the admin) become their
    400/503; /health gets its database budget, and says 503 once the worker is stopping."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        _request_state.failed = set()
        _request_state.logged = set()
        if request.path_info != HEALTH_PATH:
            return self.get_response(request)
        if stopping():  # so that a proxy or orchestrator sees this worker leave
            return api_error_response(shutting_down())
        with request_budget(HEALTH_DATABASE_BUDGET_SECONDS):
            return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        return fault_response(exception, request)


# --- Bounded round trips ------------------------------------------------------------------------


@contextmanager
def request_budget(seconds: float) -> Iterator[None]:
    """Every database round trip of this thread ends by now + seconds, whatever its own bound."""
    previous = _request_state.deadline
    _request_state.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _request_state.deadline = previous


class SocketWatchdog:
    """Shuts a socket down when a round trip on it outlives its deadline, which makes the
    blocked read fail at once (libpq then raises OperationalError): the one way to bound a wait
    on a server that accepted the connection and went silent. One thread for the process."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, int] = {}
        self._tripped: set[int] = set()
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, fd: int, deadline: float) -> int:
        with self._condition:
            token = next(self._tokens)
            self._armed[token] = fd
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="db-watchdog", daemon=True)
                self._thread.start()
            # Woken only for a deadline earlier than the one it sleeps until: deadlines mostly
            # come in increasing order, so a round trip costs no thread wake-up (each one is a
            # cross-CPU interrupt, tens of microseconds on a VM) and the watchdog wakes about
            # once per DATABASE_ROUND_TRIP_SECONDS, dropping the entries disarmed meanwhile.
            if self._heap[0][1] == token:
                self._condition.notify()
            return token

    def disarm(self, token: int) -> bool:
        """Whether the deadline passed (and the socket was shut down)."""
        with self._condition:
            self._armed.pop(token, None)
            if token in self._tripped:
                self._tripped.discard(token)
                return True
            return False

    def _run(self) -> None:
        with self._condition:
            while True:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)  # disarmed in time
                if not self._heap:
                    self._condition.wait()
                    continue
                deadline, token = self._heap[0]
                left = deadline - time.monotonic()
                if left > 0:
                    self._condition.wait(left)
                    continue
                heapq.heappop(self._heap)
                fd = self._armed.pop(token)
                self._tripped.add(token)
                _shut_down(fd)


def _shut_down(fd: int) -> None:
    try:
        duplicate = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        duplicate.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        duplicate.close()


WATCHDOG = SocketWatchdog()


class RoundTrip:
    tripped = False


@contextmanager
def bounded_round_trip(fd: int | None, seconds: float) -> Iterator[RoundTrip]:
    """Bounds what runs inside to `seconds` (and this thread's request budget): past it, the
    socket is shut down and what was waiting fails with OperationalError."""
    trip = RoundTrip()
    if fd is None or fd < 0:
        yield trip
        return
    deadline = time.monotonic() + seconds
    budget = _request_state.deadline
    if budget is not None:
        deadline = min(deadline, budget)
    token = WATCHDOG.arm(fd, deadline)
    try:
        yield trip
    except BaseException:
        if WATCHDOG.disarm(token):
            raise OperationalError("The database did not answer in time.") from None
        raise
    # An answer that arrived just before the shutdown stands (a commit that happened must not
    # be reported as failed); the broken connection fails its next use instead.
    trip.tripped = WATCHDOG.disarm(token)
