"""WSGI entry point; gunicorn imports `application` once per worker, which loads the model.

The request body stream is wrapped so that a body the client breaks (a malformed or truncated
chunked encoding, a connection closed before Content-Length bytes) surfaces as one exception the
app answers with a 400 in the error shape, wherever it is read, instead of gunicorn's parser
errors and IOErrors reaching Django as a 500 with a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "embedplatform.settings")

try:  # gunicorn's own body errors; absent when another server runs the app
    from gunicorn.http.errors import ParseException as _ServerParseError
except ImportError:  # pragma: no cover
    _ServerParseError = OSError

_BROKEN_BODY = (OSError, _ServerParseError)


class GuardedInput:
    """wsgi.input with every read failure turned into MalformedBody."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _guard(self, read: Callable[..., Any], *args: Any) -> Any:
        try:
            return read(*args)
        except MalformedBody:
            raise
        except _BROKEN_BODY as exc:
            raise MalformedBody(type(exc).__name__) from exc

    def read(self, *args: Any) -> bytes:
        return bytes(self._guard(self._stream.read, *args))

    def readline(self, *args: Any) -> bytes:
        return bytes(self._guard(self._stream.readline, *args))

    def readlines(self, *args: Any) -> list[bytes]:
        return list(self._guard(self._stream.readlines, *args))

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


def guard_body(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        stream = environ.get("wsgi.input")
        if stream is not None and not isinstance(stream, GuardedInput):
            environ["wsgi.input"] = GuardedInput(stream)
        return app(environ, start_response)

    return guarded


django.setup(set_prefix=False)  # as get_wsgi_application does, for our handler

from embedplatform.faults import MalformedBody  # noqa: E402  (needs Django set up)
from embedplatform.handler import EmbedPlatformHandler  # noqa: E402

_django_application = EmbedPlatformHandler()

application = guard_body(_django_application)
