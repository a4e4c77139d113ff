"""Structured logs: one JSON object per line in one shape, every line a request causes carrying
the id its response returns in `x-request-id`, and no credential ever written."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from django.core.signals import request_finished, request_started
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory
from gunicorn.config import Config

from embedplatform.logs import (
    GunicornJsonLogger,
    JsonFormatter,
    RequestIdFilter,
    RequestLogContextMiddleware,
    access_fields,
    current_request_id,
)
from tests.conftest import Person
from tests.service import Service, free_port, start_service


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The project's handler set-up (formatter and filter) on a logger of the test's own."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("tests.logging")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield stream
    logger.removeHandler(handler)
    current_request_id.set(None)


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- The formatter and the filter -------------------------------------------------------------


def test_it_writes_one_json_object_per_line_with_the_documented_fields(
    captured: io.StringIO,
) -> None:
    logger = logging.getLogger("tests.logging")
    logger.warning("model_loaded_successfully", extra={"model": "m", "seconds": 1.5})
    logger.info("multi\nline %s", "événement", extra={"opaque": object()})
    request = RequestFactory().get("/embed?api_key=query-secret")
    logger.error("Service Unavailable: /embed", extra={"request": request})
    try:
        raise ValueError("broken")
    except ValueError:
        logger.exception("unhandled_error")

    first, second, django_line, third = lines(captured.getvalue())
    assert list(first)[:4] == ["time", "level", "logger", "event"]
    assert first["level"] == "warning"
    assert first["logger"] == "tests.logging"
    assert first["event"] == "model_loaded_successfully"
    assert (first["model"], first["seconds"]) == ("m", 1.5)
    assert first["time"].endswith("+00:00")
    assert "request_id" not in first  # written outside a request
    # A newline in a message stays inside its line; non-ASCII is kept readable.
    assert second["event"] == "multi\nline événement"
    assert second["opaque"].startswith("<object object")
    assert "événement" in captured.getvalue()
    # Django's own request lines name the request without its query string.
    assert django_line["request"] == "GET /embed"
    assert "query-secret" not in captured.getvalue()
    assert third["level"] == "error"
    assert "ValueError: broken" in third["exception"]


def test_it_adds_the_current_request_id_and_keeps_one_given_explicitly(
    captured: io.StringIO,
) -> None:
    logger = logging.getLogger("tests.logging")
    current_request_id.set("req-1")
    logger.info("inside")
    logger.info("explicit", extra={"request_id": "req-2"})
    current_request_id.set(None)
    logger.info("outside")

    inside, explicit, outside = lines(captured.getvalue())
    assert inside["request_id"] == "req-1"
    assert explicit["request_id"] == "req-2"
    assert "request_id" not in outside


def test_it_gives_the_request_id_to_lines_after_the_view_and_forgets_it_when_the_request_ends(
    captured: io.StringIO,
) -> None:
    logger = logging.getLogger("tests.logging")

    def view(request: HttpRequest) -> HttpResponse:
        logger.warning("in_view")
        return HttpResponse(status=503)

    request = RequestFactory().get("/embed")
    # [attr-defined]: what RequestIdMiddleware sets on a real request.
    request.request_id = "abc-123"  # type: ignore[attr-defined]
    request_started.send(sender=None)
    RequestLogContextMiddleware(view)(request)
    # What Django's handler logs after the middleware chain has returned (a 5xx) is the
    # request's too.
    logger.error("Service Unavailable: /embed")
    request_finished.send(sender=None)
    logger.info("between_requests")

    in_view, after_view, between = lines(captured.getvalue())
    assert in_view["request_id"] == after_view["request_id"] == "abc-123"
    assert "request_id" not in between


# --- gunicorn's logger --------------------------------------------------------------------------


def test_it_writes_gunicorn_access_lines_in_the_same_shape_without_request_headers(
    tmp_path: Path,
) -> None:
    access_path, error_path = tmp_path / "access.log", tmp_path / "error.log"
    config = Config()
    config.set("accesslog", str(access_path))
    config.set("errorlog", str(error_path))
    log = GunicornJsonLogger(config)
    environ = {
        "REMOTE_ADDR": "10.0.0.7",
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/embed",
        "QUERY_STRING": "api_key=query-secret",
        "RAW_URI": "/embed?api_key=query-secret",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_AUTHORIZATION": "Bearer header-secret",
        "HTTP_USER_AGENT": "curl/8",
    }
    response = SimpleNamespace(
        status="429 Too Many Requests", headers=[("X-Request-ID", "rid-9")], sent=321
    )
    log.access(response, SimpleNamespace(headers=[]), environ, timedelta(milliseconds=12.5))
    log.info("Booting worker with pid: %s", 42)

    (access,) = lines(access_path.read_text())
    assert list(access)[:4] == ["time", "level", "logger", "event"]
    assert (access["level"], access["logger"], access["event"]) == (
        "info",
        "gunicorn.access",
        "access",
    )
    assert access["request_id"] == "rid-9"
    assert (access["method"], access["path"], access["status"]) == ("POST", "/embed", 429)
    assert (access["bytes"], access["duration_ms"]) == (321, 12.5)
    assert (access["remote"], access["user_agent"]) == ("10.0.0.7", "curl/8")
    assert "secret" not in access_path.read_text()
    (booting,) = lines(error_path.read_text())
    assert (booting["logger"], booting["event"]) == (
        "gunicorn.error",
        "Booting worker with pid: 42",
    )


# --- A real gunicorn ------------------------------------------------------------------------------


@pytest.fixture
def service_without_redis(tmp_path: Path) -> Iterator[Service]:
    """Redis unreachable and fail-closed: each embed request logs the outage once and is refused
    503, and gunicorn writes its access line: two lines of one request, from two places (one
    inside Django, one outside). /health is 503 too, so readiness is its answering at all."""
    service = start_service(
        tmp_path,
        env={
            "MODEL_QUANTIZATION": "fp32",
            "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "RATE_LIMIT_FAIL_OPEN": "false",
        },
        wait=False,
    )
    deadline = time.monotonic() + 120
    while True:
        assert service.process.poll() is None, service.log()
        assert time.monotonic() < deadline, service.log()
        try:
            service.get("/health", timeout=2)
            break
        except requests.RequestException:
            time.sleep(0.2)
    yield service
    service.stop()


@pytest.mark.service
@pytest.mark.django_db(transaction=True)
def test_it_puts_the_request_id_on_every_line_a_request_causes_and_never_the_credential(
    alice: Person, service_without_redis: Service
) -> None:
    token = alice.token

    def refused(number: int) -> requests.Response:
        return service_without_redis.post(
            "/embed?api_key=query-secret",
            json={"text": f"request {number}"},
            headers={"Authorization": f"Bearer {token}", "X-Request-ID": f"trace-{number}"},
        )

    # Concurrent, so that the worker's threads serve them at once: an id must not stray.
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(refused, range(8)))
    generated = refused(99)
    generated_id = generated.headers["x-request-id"]
    assert [r.status_code for r in [*responses, generated]] == [503] * 9
    assert [r.headers["x-request-id"] for r in responses] == [f"trace-{n}" for n in range(8)]
    assert service_without_redis.stop() == 0

    text = service_without_redis.log()
    records = lines(text)  # every line of the server is one JSON object
    for request_id in [*(f"trace-{n}" for n in range(8)), generated_id]:
        mine = [r for r in records if r.get("request_id") == request_id]
        # The cause once, and the access line; Django's own line for a deliberate 503 is dropped
        # (embedplatform.faults.QuietFaultsFilter), so a fault is never logged twice.
        assert sorted((r["logger"], r["event"]) for r in mine) == [
            ("accounts.ratelimit", "rate_limit_backend_unavailable"),
            ("gunicorn.access", "access"),
        ], mine
        access = next(r for r in mine if r["logger"] == "gunicorn.access")
        assert (access["method"], access["path"], access["status"]) == ("POST", "/embed", 503)
    # Every line written while serving these requests carries one of their ids.
    for record in records:
        if record["event"] in ("rate_limit_backend_unavailable", "access"):
            assert record.get("request_id"), record
    assert token not in text
    assert "Bearer" not in text
    assert "query-secret" not in text


def test_it_writes_the_access_line_exactly_as_logging_would(tmp_path: Path) -> None:
    access_path = tmp_path / "access.log"
    config = Config()
    config.set("accesslog", str(access_path))
    log = GunicornJsonLogger(config)
    environ = {"REMOTE_ADDR": "10.0.0.7", "REQUEST_METHOD": "POST", "PATH_INFO": "/v1/embeddings"}
    response = SimpleNamespace(status="200 OK", headers=[("X-Request-ID", "rid-1")], sent=99)

    fields = access_fields(response, environ, timedelta(milliseconds=3))
    # Only gunicorn's own handler, as in a worker (pytest's capture may have added its own).
    others = [h for h in log.access_log.handlers if type(h) is not logging.FileHandler]
    for handler in others:
        log.access_log.removeHandler(handler)
    try:
        assert log._write_access_line(fields)  # not through logging
        log.access_log.info("access", extra=fields)
    finally:
        for handler in others:
            log.access_log.addHandler(handler)

    written, through_logging = lines(access_path.read_text())
    written_at = datetime.fromisoformat(written.pop("time"))
    logged_at = datetime.fromisoformat(through_logging.pop("time"))
    assert written_at.tzinfo == logged_at.tzinfo == UTC
    assert 0 <= (logged_at - written_at).total_seconds() < 5
    assert list(written.items()) == list(through_logging.items())


def test_it_leaves_the_access_line_to_logging_where_the_logger_filters_it(
    tmp_path: Path,
) -> None:
    access_path = tmp_path / "access.log"
    config = Config()
    config.set("accesslog", str(access_path))
    log = GunicornJsonLogger(config)
    response = SimpleNamespace(status="200 OK", headers=[], sent=2)

    def not_health(record: logging.LogRecord) -> bool:
        return getattr(record, "path", "") != "/health"

    log.access_log.addFilter(not_health)  # gunicorn's access logger is the process's
    try:
        for path in ("/health", "/embed"):
            environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path}
            log.access(response, SimpleNamespace(headers=[]), environ, timedelta(milliseconds=1))
    finally:
        log.access_log.removeFilter(not_health)

    assert [line["path"] for line in lines(access_path.read_text())] == ["/embed"]
