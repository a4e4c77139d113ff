"""The gunicorn worker's own ways with connections (embedplatform/shutdown.py): a response in
one write, the heartbeat at most twice a second, no drain of a body that was read to its end,
and a kept-alive connection's next request served by the thread that answered the last one.
Each saves system calls that let the GIL go among busy request threads."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from gunicorn import util
from gunicorn.config import Config
from gunicorn.http.body import LengthReader
from gunicorn.http.wsgi import Response

from embedplatform import shutdown
from embedplatform.shutdown import GracefulThreadWorker, OneWriteResponse
from tests.conftest import Person
from tests.service import start_service


class RecordingSocket:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.writes.append(bytes(data))


def written(
    response_class: type[Response], headers: list[tuple[str, str]], body: bytes
) -> list[bytes]:
    """What a response of `response_class` writes, one item per system call."""
    sock = RecordingSocket()
    request = SimpleNamespace(method="POST", version=(1, 1), should_close=lambda: False)
    response = response_class(request, sock, Config())
    response.start_response("200 OK", headers)
    response.write(body)
    response.close()
    return sock.writes


@pytest.fixture
def fixed_date(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(util, "http_date", lambda *_: "Mon, 30 Nov 2026 10:00:00 GMT")


def test_it_writes_status_line_headers_and_body_at_once(fixed_date: None) -> None:
    headers = [("Content-Type", "application/json"), ("Content-Length", "11")]

    ours = written(OneWriteResponse, headers, b'{"ok":true}')

    gunicorns = written(Response, headers, b'{"ok":true}')
    assert len(gunicorns) == 2
    assert ours == [b"".join(gunicorns)]
    assert ours[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert ours[0].endswith(b'\r\n\r\n{"ok":true}')


def test_it_leaves_a_response_of_unknown_length_to_gunicorn(fixed_date: None) -> None:
    headers = [("Content-Type", "text/plain")]  # no length: chunked
    assert written(OneWriteResponse, headers, b"piece") == written(Response, headers, b"piece")


def bare_worker(monkeypatch: pytest.MonkeyPatch, clock: list[float]) -> GracefulThreadWorker:
    """A worker object without a process behind it, on a clock the test moves."""
    monkeypatch.setattr(shutdown, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    worker = object.__new__(GracefulThreadWorker)
    worker.timeout = 30
    return worker


def test_it_touches_the_heartbeat_at_most_twice_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    worker = bare_worker(monkeypatch, clock)
    touched: list[float] = []
    worker.tmp = SimpleNamespace(notify=lambda: touched.append(clock[0]))

    for now in (100.0, 100.1, 100.4, 100.5, 100.6, 101.2):
        clock[0] = now
        worker.notify()

    assert touched == [100.0, 100.5, 101.2]


def test_it_touches_the_heartbeat_well_within_a_short_worker_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    worker = bare_worker(monkeypatch, clock)
    worker.timeout = 1
    touched: list[float] = []
    worker.tmp = SimpleNamespace(notify=lambda: touched.append(clock[0]))

    for now in (100.0, 100.2, 100.25, 100.4, 100.5):
        clock[0] = now
        worker.notify()

    assert touched == [100.0, 100.25, 100.5]


def test_it_notices_a_new_parent_within_half_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    worker = bare_worker(monkeypatch, clock)
    worker.ppid = os.getppid()
    worker.log = SimpleNamespace(info=lambda *_: None)
    assert worker.is_parent_alive()

    worker.ppid = os.getppid() + 1  # as if the arbiter died and the worker was re-parented
    clock[0] = 100.3
    assert worker.is_parent_alive()  # not asked yet
    clock[0] = 100.5
    assert not worker.is_parent_alive()


def connection_with_body(*, left: int, unread: bytes = b"", failed: bool = False) -> Any:
    """A kept-alive connection whose request body has `left` bytes still on the socket and
    `unread` read but not handed to the app."""
    buffer = io.BytesIO()
    buffer.write(unread)
    body = SimpleNamespace(reader=LengthReader(None, left), buf=buffer, failed=failed)
    drains: list[float] = []

    def finish_body(deadline: float) -> bool:
        drains.append(deadline)
        return False  # as a client that stalls mid-body

    parser = SimpleNamespace(mesg=SimpleNamespace(body=body), finish_body=finish_body)
    return SimpleNamespace(parser=parser, drains=drains)


def test_it_keeps_a_connection_whose_body_was_read_to_its_end_without_draining_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = bare_worker(monkeypatch, [100.0])
    done = connection_with_body(left=0)

    assert worker._keepalive_after(done, True) is True
    assert done.drains == []
    assert worker._keepalive_after(done, False) is False


@pytest.mark.parametrize(
    "conn",
    [
        pytest.param(connection_with_body(left=5), id="body left on the socket"),
        pytest.param(connection_with_body(left=0, unread=b"xy"), id="body read but not used"),
        pytest.param(connection_with_body(left=0, failed=True), id="body failed to read"),
    ],
)
def test_it_lets_gunicorn_drain_or_close_a_connection_with_body_left(
    monkeypatch: pytest.MonkeyPatch, conn: Any
) -> None:
    worker = bare_worker(monkeypatch, [100.0])
    assert worker._keepalive_after(conn, True) is False
    assert len(conn.drains) == 1  # gunicorn's own way


def test_it_hands_a_kept_alive_connection_back_while_another_waits_for_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = bare_worker(monkeypatch, [100.0])
    worker.alive = True
    worker.cfg = SimpleNamespace(threads=8)
    worker._lingering = 0
    worker._linger_lock = threading.Lock()
    ours, client = socket.socketpair()
    with ours, client:
        conn = SimpleNamespace(
            is_http2=False,
            sock=ours,
            parser=SimpleNamespace(unreader=SimpleNamespace(buf=io.BytesIO())),
        )
        client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # its next request is there
        worker._waiting_for_a_thread = 0
        assert worker._next_request_arrives(conn)

        worker._waiting_for_a_thread = 1  # a connection the pool has not started yet

        assert not worker._next_request_arrives(conn)
        conn.parser.unreader.buf.write(b"GET /health HTTP/1.1\r\n")  # read ahead: the same
        assert not worker._next_request_arrives(conn)
        assert worker._lingering == 0


def test_it_accepts_nothing_on_a_listener_it_closed_in_the_same_turn_of_its_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = bare_worker(monkeypatch, [100.0])
    worker._listening = False  # as _stop_listening leaves it, the listeners closed

    class ClosedListener:
        def accept(self) -> Any:
            raise AttributeError("'NoneType' object has no attribute 'accept'")  # gunicorn's

    worker.accept(ClosedListener())  # a readiness the poller reported before the close


# --- A real gunicorn ------------------------------------------------------------------------


def raw_exchange(url: str, payload: bytes, responses: int) -> list[bytes]:
    """Sends `payload` on one connection and reads `responses` whole HTTP responses."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(payload)
        data = b""
        answers: list[bytes] = []
        while len(answers) < responses:
            chunk = connection.recv(65536)
            assert chunk, f"closed after {len(answers)} responses"
            data += chunk
            while b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                if len(rest) < length:
                    break
                answers.append(head + b"\r\n\r\n" + rest[:length])
                data = rest[length:]
    return answers


@pytest.mark.service
@pytest.mark.django_db(transaction=True)
def test_it_serves_kept_alive_connections_at_once_after_a_pause_and_pipelined(
    alice: Person, tmp_path: Path
) -> None:
    alice.tenant.requests_per_minute = 1_000
    alice.tenant.save(update_fields=["requests_per_minute"])
    # Fewer threads than kept-alive connections: at most half of them wait on a connection.
    service = start_service(tmp_path, env={"MODEL_QUANTIZATION": "fp32", "GUNICORN_THREADS": "4"})
    try:
        sessions = [requests.Session() for _ in range(6)]

        def embed_on(session: requests.Session, text: str) -> int:
            response = session.post(
                service.url + "/embed", json={"text": text}, headers=alice.headers, timeout=60
            )
            return response.status_code

        statuses: list[int] = []

        def back_to_back(index: int) -> None:
            statuses.extend(embed_on(sessions[index], f"{index} {n}") for n in range(3))

        threads = [threading.Thread(target=back_to_back, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert statuses == [200] * 18
        # Six idle kept-alive connections hold no thread a new connection needs.
        assert requests.get(service.url + "/health", timeout=10).status_code == 200
        time.sleep(shutdown.KEEPALIVE_LINGER_SECONDS * 3)  # back in gunicorn's poller
        assert [embed_on(session, "after a pause") for session in sessions] == [200] * 6

        # Two requests in one write: the second is read ahead with the first.
        health = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
        answers = raw_exchange(service.url, health * 2, responses=2)
        assert [answer.split(b"\r\n", 1)[0] for answer in answers] == [b"HTTP/1.1 200 OK"] * 2

        # Clients that leave while a thread waits on their connection free that thread.
        for _ in range(8):
            assert len(raw_exchange(service.url, health, responses=1)) == 1
        assert embed_on(requests.Session(), "still served") == 200
    finally:
        assert service.stop() == 0
    assert "Traceback" not in service.log()


class AnsweredDuringTheWait(Future[str]):
    """A future whose answer comes just as a wait for it gives up."""

    def result(self, timeout: float | None = None) -> str:
        if not self.done():
            self.set_result("vectors")
            raise FutureTimeout
        return super().result(timeout)


def test_it_takes_an_answer_that_came_as_the_wait_for_it_gave_up() -> None:
    assert shutdown.wait_for_result(AnsweredDuringTheWait(), timeout=5) == "vectors"


def test_it_gives_a_future_that_never_answers_up_after_its_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(FutureTimeout):
        shutdown.wait_for_result(Future(), timeout=0.2)
    assert 0.15 < time.monotonic() - started < 2
