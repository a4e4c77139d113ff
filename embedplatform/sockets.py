"""Sockets that let the GIL go less often.

Among a worker's busy request threads, every system call that lets the GIL go costs a context
switch or two to take it back, more than the call itself. Two kinds are avoidable:
- Python's own socket timeouts: with one set, each send and each receive is a poll() and then
  the call. The kernel's send and receive timeouts bound a blocking socket as well, at no cost
  per call (`use_kernel_timeouts`).
- Setting a mode the socket has already: `settimeout` and `setblocking` make an ioctl each
  time, and gunicorn sets the mode two or three times per kept-alive request (`SettledSocket`).
"""

from __future__ import annotations

import socket
import struct


def use_kernel_timeouts(sock: socket.socket, seconds: float | None) -> bool:
    """Makes a plain TCP socket blocking, bounded by the kernel's send and receive timeouts of
    `seconds` instead of Python's; False (and nothing changed) where that cannot be: a zero
    timeval would mean no timeout at all. A call that times out raises BlockingIOError (EAGAIN)
    instead of TimeoutError."""
    if seconds is None or seconds < 0.001:
        return False
    sock.settimeout(None)
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    return True


class SettledSocket(socket.socket):
    """A socket whose `settimeout` and `setblocking` make no system call when the mode they set
    is the one it has."""

    __slots__ = ()

    def settimeout(self, value: float | None) -> None:
        if value != self.gettimeout():
            super().settimeout(value)

    def setblocking(self, flag: bool) -> None:
        # What socket.setblocking does: blocking is no timeout, non-blocking a zero one.
        self.settimeout(None if flag else 0.0)


def is_plain(sock: socket.socket) -> bool:
    """A plain socket (not TLS's, not a SettledSocket already): it can become a SettledSocket
    by assigning its __class__, the two having the same layout."""
    return type(sock) is socket.socket
