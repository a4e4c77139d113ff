"""A TCP proxy a test controls, in front of the real PostgreSQL or Redis, to make it fail without
touching the shared server: `forward` (a working dependency), `refuse` (connections refused,
open ones reset: a server that is down) and `hang` (connections accepted, nothing answered, open
ones silent: a server that is stuck)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from typing import Literal

Mode = Literal["forward", "refuse", "hang"]


class TcpProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode: Mode = "forward"
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._listener: socket.socket | None = None
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = int(probe.getsockname()[1])
        probe.close()
        self._listen()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections.append(client)
                mode = self.mode
            if mode == "hang":
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections.append(server)
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if self.mode == "hang":
                    continue  # swallowed: the other side waits for ever
                target.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)

    def _swallow(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while client.recv(65536):
                pass

    def set(self, mode: Mode) -> None:
        with self._lock:
            self.mode = mode
            connections, self._connections = self._connections, []
            listener = self._listener
        if mode == "refuse":
            if listener is not None:
                # shutdown wakes the thread blocked in accept(), which close alone does not.
                with contextlib.suppress(OSError):
                    listener.shutdown(socket.SHUT_RDWR)
                listener.close()
                self._listener = None
            for connection in connections:
                _reset(connection)
        else:
            with self._lock:
                self._connections.extend(connections)
            if self._listener is None:
                self._listen()

    def close(self) -> None:
        self.set("refuse")


def _reset(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        # Linger 0: close with a reset, as a crashed server's kernel would.
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # shutdown, not only close: close leaves a socket open while a thread reads it.
        connection.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        connection.close()
