"""A JSON parser that refuses oversized bodies and bad encodings with clear errors.

DRF's own parser reads the WSGI stream directly, which bypasses Django's
DATA_UPLOAD_MAX_MEMORY_SIZE check; this one enforces it (413) on what it reads, whatever the
Content-Length said (a chunked body gets its length from ChunkedBodyMiddleware); a body the client
broke (embedplatform.wsgi) is a 400 `malformed_body`.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from embedplatform.errors import request_too_large
from embedplatform.faults import MalformedBody, malformed_body


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every body: json.loads with a keyword argument builds a new one on each call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


class BoundedJSONParser(JSONParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        try:
            raw = stream.read(limit + 1) if stream is not None else b""
        except MalformedBody as exc:
            raise malformed_body() from exc
        if len(raw) > limit:
            raise request_too_large()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(
                "The request body is not valid UTF-8.", code="invalid_encoding"
            ) from exc
        try:
            return _DECODER.decode(text)
        except ValueError as exc:
            raise ParseError(
                f"The request body is not valid JSON: {exc}", code="invalid_json"
            ) from exc
        except RecursionError as exc:  # [[[[...]]]] deeper than Python's stack
            raise ParseError(
                "The request body is not valid JSON: it is nested too deeply.", code="invalid_json"
            ) from exc
