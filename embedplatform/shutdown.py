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
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

T = TypeVar("T")

# Time kept back before the graceful deadline to answer and log what is refused.
SHUTDOWN_MARGIN_SECONDS = 3.0

# How often a waiting request looks whether its worker started stopping.
_POLL_SECONDS = 1.0

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
    from gunicorn.workers.gthread import ThreadWorker
except ImportError:  # pragma: no cover - not under gunicorn
    ThreadWorker = object


class GracefulThreadWorker(ThreadWorker):
    def init_process(self) -> None:
        # gunicorn answers a request it cannot parse itself, through this module-level writer
        # (HTML by default); swapped here, in the worker's own process, for the API's JSON.
        from gunicorn import util

        from embedplatform.http_errors import write_json_error

        util.write_error = write_json_error
        super().init_process()

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
            listener.close()

    def handle_request(self, req: Any, conn: Any) -> Any:
        conn.sock.settimeout(client_timeout())
        keepalive = super().handle_request(req, conn)
        if not self.alive:  # max_requests reached: this worker drains and leaves
            begin_stopping(self.cfg.graceful_timeout)
        return keepalive


def client_timeout() -> float:
    return float(os.environ.get("GUNICORN_CLIENT_TIMEOUT") or 30)


def wait_for_result(future: Future[T], timeout: float) -> T:
    """future.result(timeout), ended SHUTDOWN_MARGIN_SECONDS before the worker's deadline when
    it starts stopping meanwhile (TimeoutError either way)."""
    end = time.monotonic() + timeout
    while True:
        left = encode_wait_seconds(end - time.monotonic())
        try:
            return future.result(timeout=min(left, _POLL_SECONDS))
        except FutureTimeout:
            if left <= _POLL_SECONDS:
                raise
