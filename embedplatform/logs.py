"""Structured logs: one JSON object per line (python-json-logger), each line a request causes
carrying that request's id, gunicorn's own lines and access lines in the same shape.

Every line has `time` (ISO 8601, UTC), `level`, `logger` and `event`, then the fields passed with
`extra=`, then `request_id` when the line was written while a request was being served: the id
the response carries in `x-request-id`, so a client's quoted id finds every line of its request.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from django.core.signals import request_finished, request_started
from django.http import HttpRequest, HttpResponse
from gunicorn import glogging
from pythonjsonlogger.core import LogData
from pythonjsonlogger.json import JsonFormatter as LibraryJsonFormatter

# The id of the request this thread is serving; None between requests.
current_request_id: ContextVar[str | None] = ContextVar("current_request_id", default=None)


class JsonFormatter(LibraryJsonFormatter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The names operators grep for, kept from the formatter this replaces.
        super().__init__(
            ["levelname", "name", "message"],
            rename_fields={
                "levelname": "level",
                "name": "logger",
                "message": "event",
                "exc_info": "exception",
            },
            timestamp="time",
            json_ensure_ascii=False,
        )

    def jsonify_log_record(self, log_data: LogData) -> str:
        # orjson: a third of the line's cost goes otherwise to json.dumps, and an access line is
        # written for every request. It writes UTF-8 as is (ensure_ascii off) and datetimes in
        # ISO 8601, as the library's encoder does; anything else it cannot encode, as str().
        return orjson.dumps(log_data, default=str).decode()

    def process_log_record(self, log_data: LogData) -> LogData:
        log_data["level"] = str(log_data["level"]).lower()
        for key, value in log_data.items():
            # Django passes the request itself to `django.request` lines; its repr would show
            # the query string, which may carry a secret.
            if isinstance(value, HttpRequest):
                log_data[key] = f"{value.method} {value.path}"
        # Time first, as a human reading the raw stream expects.
        return {"time": log_data.pop("time"), **log_data}


class RequestIdFilter(logging.Filter):
    """Adds the current request's id to a line written while the request is being served. On a
    handler, not a logger, so that lines propagated from every library's logger get it too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            request_id = current_request_id.get()
            if request_id is not None:
                record.request_id = request_id
        return True


class RequestLogContextMiddleware:
    """Makes request.request_id (set by RequestIdMiddleware, just before) the id of every line
    this request causes. Left set after the response, not reset here: Django logs a 5xx to
    `django.request` after the middleware chain has returned, and that line is the request's too.
    The request_started/request_finished signals clear it, so no later line inherits it."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        # [attr-defined]: set by RequestIdMiddleware, which runs first.
        current_request_id.set(request.request_id)  # type: ignore[attr-defined]
        return self.get_response(request)


def _forget_request_id(**kwargs: Any) -> None:
    current_request_id.set(None)


# gunicorn serves a worker's requests from a pool of threads: each thread keeps its context from
# one request to the next, so an id must not outlive its request.
request_started.connect(_forget_request_id, dispatch_uid="embedplatform.logs.request_started")
request_finished.connect(_forget_request_id, dispatch_uid="embedplatform.logs.request_finished")


def _status_code(status: Any) -> int | str:
    code = status.split(None, 1)[0] if isinstance(status, str) else status
    return int(code) if str(code).isdigit() else str(code)


def access_fields(resp: Any, environ: dict[str, Any], request_time: timedelta) -> dict[str, Any]:
    """An access line's fields. No request header is logged (Authorization least of all), and
    the path without its query string, which may carry something secret. The request id is the
    one the response carries: gunicorn logs the access line after Django has returned."""
    request_id = next(
        (str(value) for name, value in resp.headers or () if str(name).lower() == "x-request-id"),
        "",
    )
    return {
        "remote": environ.get("REMOTE_ADDR", ""),
        "method": environ.get("REQUEST_METHOD", ""),
        "path": environ.get("PATH_INFO", ""),
        "status": _status_code(resp.status),
        "bytes": getattr(resp, "sent", None),
        "duration_ms": round(request_time.total_seconds() * 1000, 2),
        "request_id": request_id,
        "user_agent": environ.get("HTTP_USER_AGENT", ""),
        "pid": os.getpid(),
    }


class GunicornJsonLogger(glogging.Logger):
    """gunicorn's logger (`logger_class`), its lines in the project's JSON shape: `event` is
    gunicorn's message, or `access` for an access line."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(JsonFormatter())
                handler.addFilter(RequestIdFilter())

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        try:
            fields = access_fields(resp, environ, request_time)
            if not self._write_access_line(fields):
                self.access_log.info("access", extra=fields)
        except Exception:
            self.exception("access_log_failed")

    def _write_access_line(self, fields: dict[str, Any]) -> bool:
        """Writes the access line straight to the access log's streams, as each handler's own
        emit would (its JsonFormatter's line, under its lock, then flushed). False, having
        written nothing, where that might not be the same: a filter on the logger, propagation,
        another kind of handler (syslog), formatter or filter, a stream not open yet, or the
        level off. Through `logging` a line costs 19 us, here 4, and in the service about a
        twentieth of a request's CPU: it walks the stack for its caller and builds a LogRecord,
        for fields that are all known here."""
        log = self.access_log
        handlers = log.handlers
        if (
            not handlers
            or log.filters
            or log.propagate
            or not log.isEnabledFor(logging.INFO)
            or not all(_plain_json_stream(handler) for handler in handlers)
        ):
            return False
        record = {"level": "INFO", "logger": log.name, "event": "access", **fields}
        record["time"] = datetime.now(UTC)
        for handler in handlers:
            assert isinstance(handler, logging.StreamHandler)  # _plain_json_stream says so
            assert isinstance(handler.formatter, JsonFormatter)
            formatter = handler.formatter
            line = formatter.serialize_log_record(formatter.process_log_record(dict(record)))
            with handler.lock or contextlib.nullcontext():
                handler.stream.write(line + handler.terminator)
                handler.flush()
        return True


def _plain_json_stream(handler: logging.Handler) -> bool:
    """A stream or file handler of ours, as gunicorn's logger sets them up, open and on."""
    return (
        type(handler) in (logging.StreamHandler, logging.FileHandler)
        and type(handler.formatter) is JsonFormatter
        and all(type(f) is RequestIdFilter for f in handler.filters)
        and handler.level <= logging.INFO
        and getattr(handler, "stream", None) is not None
    )
