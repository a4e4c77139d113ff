"""The HTTP edge on a real gunicorn, over raw sockets: a request body the client breaks
(malformed or truncated chunked encoding, a body shorter than its Content-Length, an oversized
chunked body) is a 4xx in the error shape on every path, never a 500 or a traceback; so is HTTP
that gunicorn itself refuses before the application runs."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from embedplatform.error_codes import CATALOGUE
from tests.service import Service, start_service

PATHS = ["/health", "/admin/login/", "/embed", "/v1/embeddings", "/batch-embed", "/no/such/path"]
BODY_LIMIT = 2048


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, django_db_setup: Any, django_db_blocker: Any
) -> Iterator[Service]:
    with django_db_blocker.unblock():
        running = start_service(
            tmp_path_factory.mktemp("edge"),
            env={"DATA_UPLOAD_MAX_MEMORY_SIZE": str(BODY_LIMIT), "GUNICORN_CLIENT_TIMEOUT": "3"},
        )
    yield running
    assert running.stop() == 0


def raw_exchange(service: Service, head: str, body: bytes, *, close_write: bool) -> bytes:
    """Sends bytes as they are, optionally ends the sending half, and reads the whole answer."""
    host, port = service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head.encode("latin-1") + body)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
            if b"\r\n\r\n" in received and _complete(received):
                break
    return received


def _complete(received: bytes) -> bool:
    head, _, body = received.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return body.endswith(b"0\r\n\r\n")


def status_and_json(received: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, json.loads(body)


def _dechunk(body: bytes) -> bytes:
    data = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        data, body = data + body[:size], body[size + 2 :]
    return data


def chunked_head(path: str, *, port: str = "") -> str:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )


BROKEN_CHUNKED = {
    # The size line is not hexadecimal.
    "bad_size": (b"zz\r\n{}\r\n0\r\n\r\n", False),
    # A chunk's data does not end with CRLF.
    "missing_terminator": (b"2\r\n{}XX0\r\n\r\n", False),
    # The client stops mid-chunk and closes its sending half.
    "truncated": (b'10\r\n{"text": "', True),
    # The size line never ends.
    "endless_size_line": (b"1" * 9000, True),
    # A size far beyond anything the body then holds.
    "huge_size": (b"FFFFFFFFFFFFFFF\r\nabc", True),
}


@pytest.mark.service
@pytest.mark.parametrize("case", sorted(BROKEN_CHUNKED))
def test_it_answers_a_broken_chunked_body_with_400_on_every_path(
    service: Service, case: str
) -> None:
    body, close_write = BROKEN_CHUNKED[case]
    for path in PATHS:
        received = raw_exchange(service, chunked_head(path), body, close_write=close_write)
        status, payload = status_and_json(received)
        assert status == 400, (path, received[:300])
        assert payload["error"]["type"] == "invalid_request_error", path
        assert payload["error"]["code"] == "malformed_body", path
    assert "Traceback" not in service.log()
    assert not any(record.get("status") == 500 for record in service.log_records())


@pytest.mark.service
def test_it_answers_an_oversized_chunked_body_with_413_on_every_path(service: Service) -> None:
    chunk = b"x" * 1000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    for path in PATHS:
        status, payload = status_and_json(
            raw_exchange(service, chunked_head(path), body, close_write=False)
        )
        assert status == 413, path
        assert payload["error"]["code"] == "request_too_large", path
    assert "Traceback" not in service.log()


@pytest.mark.service
@pytest.mark.parametrize("path", ["/embed", "/v1/embeddings", "/admin/login/"])
def test_it_answers_a_body_shorter_than_its_content_length_with_400(
    service: Service, path: str
) -> None:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        "Authorization: Bearer whatever\r\nContent-Length: 500\r\nConnection: close\r\n\r\n"
    )
    received = raw_exchange(service, head, b"username=a&pass", close_write=True)
    status = int(received.split(b" ", 2)[1])
    # /embed refuses the credential (401) or the body (400 or 415); the admin's login refuses
    # a POST without its CSRF cookie (403) before reading it; never a 500.
    assert status in {400, 401, 403, 415}, received[:300]
    if path != "/admin/login/":
        assert set(status_and_json(received)[1]["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in service.log()


@pytest.mark.service
def test_it_drops_a_client_that_stalls_mid_body_after_the_client_timeout(
    service: Service,
) -> None:
    # GUNICORN_CLIENT_TIMEOUT=3: a body that stops arriving frees its thread with a 400.
    received = raw_exchange(service, chunked_head("/embed"), b'10\r\n{"te', close_write=False)
    status, payload = status_and_json(received)
    assert status == 400
    assert payload["error"]["code"] == "malformed_body"


@pytest.mark.service
def test_it_still_serves_a_well_formed_chunked_body(service: Service) -> None:
    body = b'{"text": "hello"}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    status, payload = status_and_json(
        raw_exchange(service, chunked_head("/embed"), chunked, close_write=False)
    )
    # No credential: the body was read fine and the request reached authentication.
    assert status == 401
    assert payload["error"]["code"] == "missing_credentials"


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        ("GET /health HTTP/9.9\r\n\r\n", 400, "malformed_request"),
        ("POST /embed HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "malformed_request"),
        (f"GET /{'a' * 5000} HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request_line_too_long"),
        (
            f"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {'b' * 9000}\r\n\r\n",
            431,
            "request_headers_too_large",
        ),
        (
            "POST /embed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: zstd\r\n\r\n",
            501,
            "unsupported_transfer_coding",
        ),
    ],
    ids=["http-version", "header-line", "request-line-length", "header-size", "transfer-coding"],
)
def test_it_answers_requests_gunicorn_refuses_in_the_error_shape(
    service: Service, head: str, status: int, code: str
) -> None:
    received = raw_exchange(service, head, b"", close_write=False)

    answered, body = status_and_json(received)
    assert answered == status, received
    assert b"content-type: application/json" in received.lower()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == code
    assert CATALOGUE[code].matches(body), body
