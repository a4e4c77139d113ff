"""A load generator that costs the machine little: 1-text requests from one thread of
non-blocking keep-alive sockets, each request's bytes built before the clock starts. It reads
answers with a Content-Length, or without one up to the connection's end (gunicorn's sync
workers); chunked answers are not for it.

bench/service.py's 1-text runs (the service, the bare server, the stack ceiling) measure how
many requests per second a server can serve, against the model in-process. Their clients run on
the same cores, so whatever they cost is taken from the server: 16 threads of `http.client`
(bench/service.py's `load`, which also parses each response's headers, and which the 32-text
runs still use) cost about 300 us of CPU per request here, a tenth of what a metered request
costs and more than a third of what the bare server's does. This one costs a fraction of that,
and says how much (`client_cpu_us`), so the ratios compare the servers, not the clients.
"""

from __future__ import annotations

import json
import re
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Any

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CLOSES = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
_SERVER_TIMING = re.compile(rb"\r\nserver-timing:[ \t]*([^\r]*)", re.IGNORECASE)


def parse_server_timing(header: str) -> dict[str, float]:
    """A Server-Timing header's durations by name, in ms ("auth;dur=0.41, total;dur=9.2")."""
    phases = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        if duration:
            phases[name] = float(duration)
    return phases


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def prebuilt_requests(
    texts: list[str], *, host: str, port: int, path: str, token: str
) -> list[bytes]:
    """Each text as a whole HTTP/1.1 request: /embed's body, or /batch-embed's with one text."""
    requests = []
    for text in texts:
        body = json.dumps({"text": text} if path == "/embed" else {"texts": [text]}).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        requests.append(head.encode("latin-1") + body)
    return requests


@dataclass
class _Client:
    sock: socket.socket
    next_request: int
    started: float = 0.0
    received: bytearray = field(default_factory=bytearray)


def run(
    url: str,
    requests: list[bytes],
    *,
    clients: int,
    seconds: float,
    timeout: float = 60.0,
    timed_phases: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Keeps `clients` requests in flight for `seconds`, each client on its own keep-alive
    connection sending the next of `requests` as soon as its answer is whole. Returns the
    requests/s, the latency percentiles (ms), the failed answers and the CPU per request, and
    with `timed_phases` the median of their sum in each answer's Server-Timing
    (`phases_p50`)."""
    host, port_text = url.removeprefix("http://").split(":")
    port = int(port_text)
    selector = selectors.DefaultSelector()
    latencies: list[float] = []
    phases: list[float] = []
    failures: list[str] = []

    def connect(first_request: int) -> _Client:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setblocking(False)
        client = _Client(sock=sock, next_request=first_request)
        selector.register(sock, selectors.EVENT_READ, client)
        return client

    def send_next(client: _Client) -> None:
        client.started = time.perf_counter()
        client.sock.sendall(requests[client.next_request % len(requests)])
        client.next_request += 1

    cpu_started = time.thread_time()
    started = time.perf_counter()
    deadline = started + seconds
    for number in range(clients):
        send_next(connect(number * 37))
    open_clients = clients
    while open_clients:
        events = selector.select(timeout=timeout)
        if not events:
            failures.append(f"no answer in {timeout} s")
            break
        for key, _ in events:
            client: _Client = key.data
            try:
                chunk = client.sock.recv(262144)
            except ConnectionError:  # reset by the server: as closed
                chunk = b""
            client.received += chunk
            closes = not chunk
            answered = False
            while (end := client.received.find(b"\r\n\r\n")) >= 0:
                head = bytes(client.received[: end + 2])
                length_match = _CONTENT_LENGTH.search(head)
                closing = bool(_CLOSES.search(head))
                if length_match:
                    length = int(length_match.group(1))
                elif closing and chunk:
                    break  # no length: the body ends where the connection does
                else:
                    length = len(client.received) - end - 4
                if len(client.received) < end + 4 + length:
                    break
                body = bytes(client.received[end + 4 : end + 4 + length])
                del client.received[: end + 4 + length]
                answered = True
                now = time.perf_counter()
                status = int(head[9:12])
                if status == 200:
                    latencies.append((now - client.started) * 1000)
                    if timed_phases and (timing := _SERVER_TIMING.search(head)):
                        durations = parse_server_timing(timing.group(1).decode("latin-1"))
                        phases.append(sum(durations.get(name, 0.0) for name in timed_phases))
                else:
                    failures.append(f"{status} {body[:200]!r}")
                closes = closes or closing
                if now < deadline and not closes:
                    send_next(client)
                elif not closes:
                    closes = True  # done: the clock ran out
            if closes:
                selector.unregister(client.sock)
                client.sock.close()
                open_clients -= 1
                if not chunk and not answered:
                    failures.append("the server closed a connection with a request in flight")
                if time.perf_counter() < deadline:  # closed by the server: a new connection
                    send_next(connect(client.next_request))
                    open_clients += 1
    wall = time.perf_counter() - started
    cpu = time.thread_time() - cpu_started
    selector.close()

    return {
        "requests_per_s": len(latencies) / wall,
        "sentences_per_s": len(latencies) / wall,
        "requests": len(latencies),
        "failures": failures,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "latencies": latencies,
        "seconds": wall,
        "client_cpu_us": cpu * 1e6 / max(1, len(latencies)),
        "phases_p50": percentile(phases, 50),
    }
