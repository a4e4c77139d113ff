"""Graceful shutdown and worker recycling on a real gunicorn: after SIGTERM new connections are
refused at once, everything accepted is answered (served, or refused with a 503 and its usage row)
before the graceful timeout, and a worker replaced after max_requests drops no request."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from accounts.models import UsageLog
from tests.conftest import Person
from tests.service import Service, start_service

pytestmark = [pytest.mark.service, pytest.mark.django_db(transaction=True)]

WORDS = "the quick brown fox jumps over the lazy dog while the band plays on " * 6


def unlimited(person: Person) -> None:
    person.tenant.requests_per_minute = 1_000_000
    person.tenant.save(update_fields=["requests_per_minute"])


def sent(service: Service, body: dict[str, Any], headers: dict[str, str]) -> Any:
    """A request whose bytes are written, its answer not yet read."""
    host, port = service.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    connection.request(
        "POST", "/batch-embed", json.dumps(body), {**headers, "Content-Type": "application/json"}
    )
    return connection


def answered(host: str, port: int) -> bool:
    """Whether a new connection gets an HTTP answer (False: refused, reset or closed)."""
    try:
        with socket.create_connection((host, port), timeout=10) as connection:
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            return bool(connection.recv(1024))
    except (ConnectionRefusedError, ConnectionResetError):
        return False


def test_it_answers_or_refuses_everything_it_accepted_and_refuses_new_connections_at_once(
    alice: Person, tmp_path: Path
) -> None:
    unlimited(alice)
    graceful = 10
    service = start_service(
        tmp_path,
        env={
            "MODEL_QUANTIZATION": "fp32",
            "GUNICORN_GRACEFUL_TIMEOUT": str(graceful),
            # One tenant queues all the work here: room for all of it, so what ends each
            # request is the shutdown, not the batcher's per-tenant share (429).
            "BATCH_QUEUE_MAX_TEXTS": "100000",
            "BATCH_QUEUE_MAX_TOKENS": "100000000",
        },
    )
    # About twice the model work the graceful timeout allows, measured on this machine now.
    started = time.monotonic()
    calibration = service.post(
        "/batch-embed", json={"texts": [f"c {j} {WORDS}" for j in range(32)]}, headers=alice.headers
    )
    assert calibration.status_code == 200
    seconds_per_text = (time.monotonic() - started) / 32
    # The fair batcher shares passes between waiting requests, so a few small requests finish
    # early (200) while the large ones, about twice what the graceful timeout allows in all, are
    # still sharing passes when it runs out (503).
    small, large = 4, 20
    per_request = round(2 * graceful / large / seconds_per_text)
    per_request = max(4, min(per_request, 256))
    sizes = [2] * small + [per_request] * large
    connections = [
        sent(service, {"texts": [f"{i} {j} {WORDS}" for j in range(size)]}, alice.headers)
        for i, size in enumerate(sizes)
    ]
    time.sleep(1.0)  # every connection accepted, the first passes running
    stopping_at = time.monotonic()
    service.process.send_signal(signal.SIGTERM)

    # A connection opened after the signal is answered or refused at once, never left waiting
    # for the worker to exit; once the worker has closed its sockets, it is refused.
    host, port = service.url.removeprefix("http://").split(":")
    started = time.monotonic()
    answered(host, int(port))
    assert time.monotonic() - started < 5  # an answer takes a while on a busy machine
    time.sleep(1.5)
    started = time.monotonic()
    assert not answered(host, int(port))
    assert time.monotonic() - started < 1.5

    answers: list[tuple[int, str, float]] = []
    codes: list[str | None] = []
    for index, connection in enumerate(connections):
        try:
            response = connection.getresponse()
        except OSError as exc:
            raise AssertionError(f"request {index}: {exc}\n{service.log()[-3000:]}") from exc
        body = json.loads(response.read())
        answers.append(
            (response.status, response.getheader("x-request-id") or "", time.monotonic())
        )
        codes.append(body.get("error", {}).get("code"))
        if response.status != 200:
            assert response.status == 503, body
            assert body["error"]["type"] == "service_unavailable"
            assert response.getheader("Retry-After")
    exit_code = service.process.wait(timeout=graceful + 20)

    statuses = [status for status, _, _ in answers]
    # Both, or this proves nothing.
    assert 200 in statuses, statuses
    assert 503 in statuses, statuses
    assert max(t for _, _, t in answers) - stopping_at < graceful
    assert exit_code == 0, service.log()
    # Each answered request has exactly one usage row, with its status; 503s charged nothing.
    for status, request_id, _ in [*answers, (200, calibration.headers["x-request-id"], 0)]:
        rows = list(UsageLog.objects.filter(request_id=request_id))
        assert [(row.status_code, row.tokens > 0) for row in rows] == [(status, status == 200)], (
            answers,
            list(UsageLog.objects.values_list("request_id", "status_code", "error_type")),
            service.log()[-4000:],
        )
    assert "Traceback" not in service.log()


def test_it_says_503_on_health_while_stopping(alice: Person, tmp_path: Path) -> None:
    unlimited(alice)
    service = start_service(tmp_path, env={"MODEL_QUANTIZATION": "fp32"})
    host, port = service.url.removeprefix("http://").split(":")
    # A kept-alive connection, opened before the signal, asks again after it.
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", "/health")
    first = connection.getresponse()
    first.read()
    assert first.status == 200
    busy = sent(service, {"texts": [f"{j} {WORDS}" for j in range(64)]}, alice.headers)
    time.sleep(0.5)
    service.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    connection.request("GET", "/health")
    second = connection.getresponse()
    body = json.loads(second.read())
    assert second.status == 503
    assert body["error"]["code"] == "shutting_down"
    assert busy.getresponse().status == 200
    assert service.process.wait(timeout=40) == 0


def test_it_replaces_workers_after_max_requests_without_dropping_any(
    alice: Person, tmp_path: Path
) -> None:
    unlimited(alice)
    service = start_service(
        tmp_path,
        workers=2,
        env={
            "MODEL_QUANTIZATION": "fp32",
            # Low enough that a worker is surely replaced: 60 requests over 2 workers give one of
            # them at least 30, above any limit of 20 plus a jitter of up to 4.
            "GUNICORN_MAX_REQUESTS": "20",
            "GUNICORN_MAX_REQUESTS_JITTER": "4",
        },
    )
    statuses: list[int] = []
    errors: list[BaseException] = []

    def client(i: int) -> None:
        session = requests.Session()  # keep-alive, as a real client would
        for j in range(15):
            try:
                response = session.post(
                    service.url + "/embed",
                    json={"text": f"{i} {j} recycled"},
                    headers=alice.headers,
                    # A replaced worker loads its model again: slow on a busy machine.
                    timeout=300,
                )
                statuses.append(response.status_code)
            except requests.RequestException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    try:
        assert errors == []
        assert statuses == [200] * 60
        assert "Autorestarting worker" in service.log() or "max requests" in service.log().lower()
        assert "Traceback" not in service.log()
        assert UsageLog.objects.filter(tenant=alice.tenant, status_code=200).count() == 60
    finally:
        assert service.stop() == 0
