"""The HTTP edge: nginx with the configuration docker-compose.yml gives the `proxy` service
(docker/nginx/embedplatform.conf.template), run for real with Debian's nginx in front of a real
gunicorn, or of a small server that echoes what it received.

A missing nginx fails with the way to install it (scripts/system_packages.sh installs it).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from accounts.models import UsageLog
from tests.conftest import Person
from tests.service import ROOT, Service, free_port, start_service

TEMPLATE = ROOT / "docker" / "nginx" / "embedplatform.conf.template"


def render_template(*, upstream: str, port: int, resolver: str = "127.0.0.1") -> str:
    """The template filled in as the nginx image's envsubst does: only the named variables."""
    values = {
        "EMBEDPLATFORM_UPSTREAM": upstream,
        "NGINX_RESOLVER": resolver,
        "PROXY_LISTEN_PORT": str(port),
    }
    text = TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    return text


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    folder: Path

    def error_log(self) -> str:
        return (self.folder / "error.log").read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_nginx(folder: Path, *, upstream: str) -> Proxy:
    """Debian's nginx in the foreground, with a main configuration of its own in `folder` that
    includes the rendered template, as the nginx image's nginx.conf includes conf.d/."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if nginx is None:
        pytest.fail("nginx is missing: apt-get install nginx-light (scripts/system_packages.sh)")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (folder / "embedplatform.conf").write_text(render_template(upstream=upstream, port=port))
    temp_paths = "\n".join(
        f"    {kind}_temp_path {folder / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (folder / kind).mkdir(exist_ok=True)
        (folder / kind).chmod(0o777)
    # As root, nginx's workers would drop to `nobody`; these files belong to the test.
    user = "user root root;" if os.geteuid() == 0 else ""
    (folder / "nginx.conf").write_text(
        f"""{user}
worker_processes 1;
daemon off;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} info;
events {{ worker_connections 1024; }}
http {{
    access_log {folder / "access.log"};
{temp_paths}
    include {folder / "embedplatform.conf"};
}}
"""
    )
    command = [nginx, "-p", str(folder), "-c", str(folder / "nginx.conf")]
    process = subprocess.Popen(
        [*command, "-e", str(folder / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    proxy = Proxy(process=process, url=f"http://127.0.0.1:{port}", port=port, folder=folder)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}:\n{proxy.error_log()}")
        try:
            if requests.get(proxy.url + "/nginx-health", timeout=1).status_code == 200:
                return proxy
        except requests.RequestException:
            time.sleep(0.1)
    proxy.stop()
    raise RuntimeError(f"nginx did not answer within 20 s:\n{proxy.error_log()}")


def assert_error_shape(response: requests.Response | http.client.HTTPResponse, body: bytes) -> dict:
    assert response.headers["Content-Type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


# --- nginx in front of a real gunicorn -----------------------------------------------------------

pytestmark = [pytest.mark.service, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def gunicorn(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = start_service(tmp_path_factory.mktemp("gunicorn"), env={"MODEL_QUANTIZATION": "fp32"})
    yield service
    service.stop()


@pytest.fixture(scope="module")
def proxy(gunicorn: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    proxy = start_nginx(tmp_path_factory.mktemp("nginx"), upstream=gunicorn.url)
    yield proxy
    proxy.stop()


def test_it_fills_in_every_variable_of_the_template() -> None:
    rendered = render_template(
        upstream="http://embedding-api:8000", port=8080, resolver="127.0.0.11"
    )
    assert "${" not in rendered
    assert "set $embedplatform_upstream http://embedding-api:8000;" in rendered
    assert "resolver 127.0.0.11 valid=10s" in rendered


def test_it_serves_the_api_through_the_proxy_with_the_callers_request_id(
    proxy: Proxy, gunicorn: Service, alice: Person
) -> None:
    response = requests.post(
        proxy.url + "/embed",
        json={"text": "through nginx"},
        headers={**alice.headers, "X-Request-ID": "edge-trace-1"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["embedding"]) == 384
    assert response.raw.headers.getlist("X-Request-ID") == ["edge-trace-1"]
    # gunicorn got the same id: its usage row and its access log carry it. gunicorn writes the
    # access line once the response is sent, so it may come a moment after the response.
    assert UsageLog.objects.get(request_id="edge-trace-1").tenant == alice.tenant
    deadline = time.monotonic() + 10
    while not any(r.get("request_id") == "edge-trace-1" for r in gunicorn.log_records()):
        assert time.monotonic() < deadline, "no access line carries the caller's request id"
        time.sleep(0.05)


def test_it_gives_requests_without_a_usable_id_one_of_its_own(proxy: Proxy, alice: Person) -> None:
    response = requests.post(
        proxy.url + "/embed",
        json={"text": "no usable id"},
        headers={**alice.headers, "X-Request-ID": "not usable; has spaces"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    generated = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert UsageLog.objects.get(request_id=generated).tenant == alice.tenant


def test_it_refuses_an_oversized_body_before_gunicorn_reads_it(
    proxy: Proxy, gunicorn: Service, alice: Person
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    # Only the headers: the proxy answers from Content-Length without waiting for 6 MB.
    connection.putrequest("POST", "/embed")
    for name, value in {**alice.headers, "Content-Type": "application/json"}.items():
        connection.putheader(name, value)
    connection.putheader("Content-Length", str(6 * 1024 * 1024))
    connection.putheader("X-Request-ID", "edge-too-large")
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == 413
    error = assert_error_shape(response, body)
    assert error["code"] == "request_too_large"
    assert response.getheader("X-Request-ID") == "edge-too-large"
    assert "edge-too-large" not in gunicorn.log()
    assert not UsageLog.objects.filter(request_id="edge-too-large").exists()


def test_it_passes_bodies_within_the_limit_to_the_service_which_applies_its_own(
    proxy: Proxy, alice: Person
) -> None:
    # 4.5 MB: under the proxy's 5 MB, over the service's 4 MB, so the service's 413 answers.
    body = json.dumps({"text": "x" * (4 * 1024 * 1024 + 512 * 1024)})
    response = requests.post(
        proxy.url + "/embed",
        data=body,
        headers={**alice.headers, "Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413
    assert "4194304 bytes" in response.json()["error"]["message"]


class SlowClients:
    """Connections that send a request's headers, or its body, one byte at a time."""

    def __init__(self, port: int, *, headers: int, bodies: int, token: str) -> None:
        self.sockets: list[tuple[socket.socket, bytes]] = []
        for _ in range(headers):
            self._open(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        head = (
            "POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: 100000\r\n\r\n"
        ).encode()
        for _ in range(bodies):
            self._open(port, head + b'{"text": "')
        self.stopped = threading.Event()
        self.closed_by_server = 0
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _open(self, port: int, first: bytes) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(first)
        self.sockets.append((sock, first))

    def _trickle(self) -> None:
        while not self.stopped.wait(1.0):
            for sock, _ in list(self.sockets):
                try:
                    sock.sendall(b"a")
                except OSError:
                    self.sockets.remove((sock, _))
                    self.closed_by_server += 1

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        for sock, _ in self.sockets:
            sock.close()


def test_it_keeps_health_and_embed_answering_while_slow_clients_hold_connections(
    proxy: Proxy, alice: Person
) -> None:
    def health_and_embed() -> float:
        started = time.monotonic()
        health = requests.get(proxy.url + "/health", timeout=10)
        embed = requests.post(
            proxy.url + "/embed", json={"text": "still served"}, headers=alice.headers, timeout=10
        )
        assert (health.status_code, embed.status_code) == (200, 200)
        return time.monotonic() - started

    baseline = [health_and_embed() for _ in range(3)]
    # More slow connections than gunicorn has threads in all its workers: straight at gunicorn
    # they would hold every thread until its timeout, and /health would time out with them.
    slow = SlowClients(proxy.port, headers=40, bodies=40, token=alice.token)
    try:
        time.sleep(2)
        timings = [health_and_embed() for _ in range(5)]
        alone, slowed = max(baseline), max(timings)
        print(f"/health + /embed: {alone:.2f} s alone, {slowed:.2f} s with slow clients")
        assert max(timings) < 5.0, timings
        # Slow headers are cut after client_header_timeout (10 s); slow bodies keep nginx busy,
        # never gunicorn.
        deadline = time.monotonic() + 20
        while slow.closed_by_server < 40 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert slow.closed_by_server >= 40
    finally:
        slow.close()


# --- nginx in front of a server that shows what it received ---------------------------------------


class EchoHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({name.lower(): value for name, value in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def echo_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    proxy = start_nginx(
        tmp_path_factory.mktemp("echo-nginx"), upstream=f"http://127.0.0.1:{server.server_port}"
    )
    yield proxy
    proxy.stop()
    server.shutdown()


def test_it_sets_the_forwarded_headers_itself_instead_of_trusting_the_client(
    echo_proxy: Proxy,
) -> None:
    received = requests.get(
        echo_proxy.url + "/anything",
        headers={
            "Host": "embed.example.com",
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example.com",
        },
        timeout=10,
    ).json()
    assert received["x-forwarded-for"] == "127.0.0.1"
    assert received["x-real-ip"] == "127.0.0.1"
    assert received["x-forwarded-proto"] == "http"
    assert received["x-forwarded-host"] == "embed.example.com"
    assert received["x-forwarded-port"] == str(echo_proxy.port)
    assert received["host"] == "embed.example.com"
    assert re.fullmatch(r"[0-9a-f]{32}", received["x-request-id"])


def test_it_answers_503_with_retry_after_when_gunicorn_is_down(tmp_path: Path) -> None:
    proxy = start_nginx(tmp_path / "nginx", upstream=f"http://127.0.0.1:{free_port()}")
    try:
        response = requests.get(proxy.url + "/health", timeout=10)
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
        assert response.headers["X-Request-ID"]
        error = assert_error_shape(response, response.content)
        assert error["type"] == "service_unavailable"
    finally:
        proxy.stop()


def test_it_answers_malformed_requests_with_400_in_the_error_shape(echo_proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", echo_proxy.port), timeout=10) as sock:
        sock.sendall(
            b"POST /embed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request"


def test_it_answers_many_concurrent_clients_through_one_worker(proxy: Proxy, alice: Person) -> None:
    def one(i: int) -> int:
        return requests.post(
            proxy.url + "/embed", json={"text": f"client {i}"}, headers=alice.headers, timeout=60
        ).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(one, range(32)))
    assert statuses == [200] * 32
