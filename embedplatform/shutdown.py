"""A gunicorn worker that leaves cleanly (no Django or DRF imports: the arbiter loads it).

After SIGTERM (or its max_requests) it accepts nothing more, answers everything it accepted
before its graceful timeout runs out, and refuses in time (a 503, with the usage row every
refused embed request gets) what it could not serve.

gunicorn's own gthread worker keeps its listening sockets open until it exits, so a connection
opened after SIGTERM sat in the kernel's queue until the worker died (about graceful_timeout)
and was then reset; and a request still waiting for the model when the graceful timeout ran out
was cut without an answer or a usage row. Here:

- on SIGTERM the worker takes the connections already queued for it, then closes its listening
  sockets: once the arbiter has closed its own copy too, new connections are refused immediately
  (on a reload (HUP), the other workers keep listening and take them);
- the app learns the worker's deadline (`seconds_left`): waits for the model end
  SHUTDOWN_MARGIN_SECONDS before it (`wait_for_result`), and a request that starts then is
  refused at once (faults.StoppingThrottle), so each gets its 503 and its row in time;
- /health answers 503 `shutting_down`, so a proxy or orchestrator sees the worker leave;
- each request's socket reads and writes time out after GUNICORN_CLIENT_TIMEOUT seconds, so a
  client that stalls mid-body holds a thread that long at most (and gets a 400);
- a request gunicorn itself refuses (unparsable, over its size limits) is answered in the API's
  JSON error shape (embedplatform/http_errors.py), not gunicorn's HTML page.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

T = TypeVar("T")

# Time kept back before the graceful deadline to answer and log what is refused.
SHUTDOWN_MARGIN_SECONDS = 3.0

# How often a waiting request looks whether its worker started stopping.
_POLL_SECONDS = 1.0

# How long a request thread waits for the next request on its kept-alive connection before
# handing the connection back to gunicorn's poller (GracefulThreadWorker.handle).
KEEPALIVE_LINGER_SECONDS = 0.1

_deadline: float | None = None


def begin_stopping(graceful_timeout: float) -> None:
    global _deadline
    if _deadline is None:
        _deadline = time.monotonic() + graceful_timeout


def stopping() -> bool:
    return _deadline is not None


def seconds_left() -> float | None:
    """Seconds until this worker is killed, or None while it is not stopping."""
    return None if _deadline is None else _deadline - time.monotonic()


def encode_wait_seconds(default: float) -> float:
    """How long a request may wait for the model: `default`, cut short while stopping."""
    left = seconds_left()
    if left is None:
        return default
    return max(0.0, min(default, left - SHUTDOWN_MARGIN_SECONDS))


try:
    from gunicorn import util as gunicorn_util
    from gunicorn.http.body import LengthReader
    from gunicorn.http.wsgi import Response as GunicornResponse
    from gunicorn.workers.gthread import ThreadWorker
except ImportError:  # pragma: no cover - not under gunicorn
    ThreadWorker = GunicornResponse = LengthReader = object


class OneWriteResponse(GunicornResponse):
    """gunicorn's HTTP/1 response, sending its status line and headers with the body when the
    body comes in one piece of known length (as Django's responses do): one system call, not
    two, each of which lets the GIL go among busy request threads. Anything else (chunked,
    bodiless, a file) goes gunicorn's own way."""

    headers_sent: bool

    def write(self, arg: bytes) -> None:
        if (
            self.headers_sent
            or self.chunked
            or self._omits_body
            or not isinstance(arg, bytes)
            or not arg
            or self.response_length is None
            or len(arg) > self.response_length
        ):
            super().write(arg)
            return
        # gunicorn's send_headers, with the body appended.
        head = self.default_headers()
        head.extend([f"{name}: {value}\r\n" for name, value in self.headers])
        header = gunicorn_util.to_bytestring("{}\r\n".format("".join(head)), "latin-1")
        self.headers_sent = True
        self.sent += len(arg)
        gunicorn_util.write(self.sock, header + arg)


class GracefulThreadWorker(ThreadWorker):
    # gunicorn's event loop turns once per event (each request done, each connection ready), and
    # every turn touched the heartbeat file and asked for the parent's pid: four system calls
    # per request on the thread that hands out connections. Both are needed only well within
    # the worker timeout (the arbiter's, and how soon an orphan notices).
    _heartbeat_seconds = 0.5
    _last_notify = float("-inf")
    _last_parent_check = float("-inf")

    def notify(self) -> None:
        now = time.monotonic()
        if now - self._last_notify >= min(self._heartbeat_seconds, self.timeout / 4):
            self._last_notify = now
            super().notify()

    def is_parent_alive(self) -> bool:
        now = time.monotonic()
        if now - self._last_parent_check < self._heartbeat_seconds:
            return True
        self._last_parent_check = now
        return bool(super().is_parent_alive())

    def init_process(self) -> None:
        # gunicorn answers a request it cannot parse itself, through this module-level writer
        # (HTML by default); swapped here, in the worker's own process, for the API's JSON.
        from gunicorn import util
        from gunicorn.http import wsgi

        from embedplatform.http_errors import write_json_error

        util.write_error = write_json_error
        # The response class wsgi.create builds for HTTP/1 (it reads the module's name).
        wsgi.Response = OneWriteResponse
        self._listening = True
        self._lingering = 0
        self._waiting_for_a_thread = 0
        self._linger_lock = threading.Lock()
        super().init_process()

    def enqueue_req(self, conn: Any) -> None:
        with self._linger_lock:
            self._waiting_for_a_thread += 1
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        # A kept-alive connection goes back to the main thread's poller after each response,
        # and its next request comes back through the thread pool: a pipe write, two wake-ups
        # of the main thread and one of a pool thread, a dozen system calls, each letting the
        # GIL go among busy request threads. A client that sends its next request at once
        # (what a loaded API client does) is served by this thread instead, as long as no
        # other connection waits for a thread: then it takes its turn in the pool's queue.
        with self._linger_lock:
            self._waiting_for_a_thread -= 1
        keepalive = super().handle(conn)
        while keepalive is True and self._next_request_arrives(conn):
            keepalive = super().handle(conn)
        return keepalive

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        # gunicorn drains what the app left of the body under a deadline, setting the socket's
        # timeout twice (two system calls) even when nothing is left, as after every request
        # whose body Django read to its announced length.
        body: Any = getattr(conn.parser.mesg, "body", None)
        if (
            keepalive
            and isinstance(getattr(body, "reader", None), LengthReader)
            and body.reader.length == 0
            and not body.buf.tell()
            and not body.failed
        ):
            return True
        return bool(super()._keepalive_after(conn, keepalive))

    def _next_request_arrives(self, conn: Any) -> bool:
        """Whether `conn`'s next request arrives within KEEPALIVE_LINGER_SECONDS and is this
        thread's to serve: not while another connection waits for a thread, and waited for
        here by at most half the threads at once (the rest stay free for new connections)."""
        if not self.alive or conn.is_http2:
            return False
        with self._linger_lock:
            if self._waiting_for_a_thread > 0:
                return False
            if conn.parser.unreader.buf.getvalue():  # read ahead already, with the last body
                return True
            if self._lingering >= self.cfg.threads // 2:
                return False
            self._lingering += 1
        try:
            poller = select.poll()
            poller.register(conn.sock, select.POLLIN)
            return bool(poller.poll(KEEPALIVE_LINGER_SECONDS * 1000))
        except (OSError, ValueError):  # closed meanwhile: the main thread's path decides
            return False
        finally:
            with self._linger_lock:
                self._lingering -= 1

    def handle_exit(self, sig: Any, frame: Any) -> None:
        if self.alive:
            begin_stopping(self.cfg.graceful_timeout)
            # In the event loop's thread, between its callbacks.
            self.method_queue.defer(self._stop_listening)
        super().handle_exit(sig, frame)

    def _stop_listening(self) -> None:
        self.set_accept_enabled(False)
        for listener in self.sockets:
            # Connections the kernel already queued carry requests their clients sent: take
            # them (to be answered like the rest) rather than let the close reset them.
            while True:
                before = self.nr_conns
                self.accept(listener)  # non-blocking here; nothing queued: no change
                if self.nr_conns == before:
                    break
        self._listening = False
        for listener in self.sockets:
            listener.close()

    def accept(self, listener: Any) -> None:
        # The poller may have reported a listener ready in the same turn of the loop that ran
        # _stop_listening before it: that listener is closed by now.
        if self._listening:
            super().accept(listener)

    def handle_request(self, req: Any, conn: Any) -> Any:
        conn.sock.settimeout(client_timeout())
        keepalive = super().handle_request(req, conn)
        if not self.alive:  # max_requests reached: this worker drains and leaves
            begin_stopping(self.cfg.graceful_timeout)
        return keepalive


def client_timeout() -> float:
    return float(os.environ.get("GUNICORN_CLIENT_TIMEOUT") or 30)


def wait_within_encode_timeout(wait: Callable[[float], bool], timeout: float) -> bool:
    """Calls `wait(seconds)` until it returns True (then True), for at most `timeout` seconds
    in all, ended SHUTDOWN_MARGIN_SECONDS before the worker's deadline when it starts stopping
    meanwhile (then False)."""
    end = time.monotonic() + timeout
    while True:
        left = encode_wait_seconds(end - time.monotonic())
        if wait(min(max(left, 0.0), _POLL_SECONDS)):
            return True
        if left <= _POLL_SECONDS:
            return False


def wait_for_result(future: Future[T], timeout: float) -> T:
    """future.result(timeout), with `wait_within_encode_timeout`'s end: TimeoutError, and the
    future is cancelled (the batcher skips what nobody waits for any more)."""

    def settled(seconds: float) -> bool:
        try:
            future.result(timeout=seconds)
        except FutureTimeout:
            # The wait's own timeout, unless the answer came meanwhile: then the future.result()
            # below gives it (or the future's own error, a TimeoutError as it may be).
            return future.done()
        return True

    if not wait_within_encode_timeout(settled, timeout):
        future.cancel()
        raise FutureTimeout
    return future.result()
