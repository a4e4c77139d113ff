"""Hooks django-axes calls to throttle admin password guesses (settings: AXES_*).

Axes counts failed logins per username and client address and refuses both after
AXES_FAILURE_LIMIT failures until AXES_COOLOFF_MINUTES have passed. These two functions tell it
who the client is behind a reverse proxy, and what a refused login gets back.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Any

from axes.helpers import get_cool_off, get_lockout_message
from django.conf import settings
from django.http import HttpRequest, HttpResponse


def client_ip(request: HttpRequest) -> str | None:
    """The address of whoever sent the request.

    X-Forwarded-For is believed only as far as AXES_TRUSTED_PROXY_COUNT says: each trusted proxy
    appends the address it got the request from, so the client is that many entries from the
    right. Entries further left come from the client itself and may be forged; with no trusted
    proxy (the default) the header is ignored and the connection's own address counts."""
    remote = request.META.get("REMOTE_ADDR") or None
    trusted = settings.AXES_TRUSTED_PROXY_COUNT
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    if trusted <= 0 or not forwarded:
        return remote
    hops = [hop.strip() for hop in forwarded.split(",")]
    if len(hops) < trusted:
        return remote  # fewer hops than proxies: it did not come through all of them
    candidate = hops[-trusted]
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return remote


def lockout_response(
    request: HttpRequest, original_response: HttpResponse | None, credentials: Any
) -> HttpResponse:
    """Axes's own refusal (429 and its message), plus when to try again."""
    response = HttpResponse(
        get_lockout_message(),
        status=settings.AXES_HTTP_RESPONSE_CODE,
        content_type="text/plain; charset=utf-8",
    )
    cool_off = get_cool_off(request)
    if cool_off is not None:
        response["Retry-After"] = str(math.ceil(cool_off.total_seconds()))
    return response
