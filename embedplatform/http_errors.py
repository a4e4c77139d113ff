"""The API's JSON error shape for requests gunicorn refuses before the application sees them.

gunicorn answers a request it cannot parse (a malformed request line or header, a request line
or headers over its limits, an unknown transfer coding) itself, with an HTML page. Clients of
this API read `{"error": {...}}` for every other 4xx, so `GracefulThreadWorker` swaps gunicorn's
writer for `write_json_error` in its own process.
"""

from __future__ import annotations

import socket

import orjson
from gunicorn import util

from embedplatform.error_codes import CATALOGUE

# gunicorn's status for each kind of refusal, and the catalogued code it becomes here.
CODE_BY_STATUS = {
    400: "malformed_request",
    403: "forbidden",
    414: "request_line_too_long",
    417: "expectation_failed",
    431: "request_headers_too_large",
    501: "unsupported_transfer_coding",
}
# gunicorn's message quotes what the client sent; enough of it to find the fault, no more.
MAX_REASON_CHARS = 200


def json_error_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP response, head and JSON body, closing the connection (the request could not
    be delimited, so nothing after it on the connection can be trusted)."""
    code = CODE_BY_STATUS.get(status)
    if code is None:  # gunicorn's own 500: the application never ran
        status, reason, code = 500, "Internal Server Error", "internal_error"
    body = orjson.dumps(CATALOGUE[code].body(reason=message[:MAX_REASON_CHARS] or reason))
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn.util.write_error's signature, writing the API's error shape instead of HTML."""
    util.write_nonblock(sock, json_error_response(status_int, reason, mesg))
