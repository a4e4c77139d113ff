"""Request correlation: every response carries an `x-request-id`, and the usage log stores it."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

# Accept a caller's id only when it is short and plain, so it is safe to log and to echo back.
_ACCEPTABLE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_for(request: HttpRequest) -> str:
    supplied = request.META.get("HTTP_X_REQUEST_ID", "")
    if _ACCEPTABLE_REQUEST_ID.match(supplied):
        return supplied
    return uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request.request_id = request_id_for(request)  # type: ignore[attr-defined]
        response = self.get_response(request)
        response["x-request-id"] = request.request_id  # type: ignore[attr-defined]
        return response
