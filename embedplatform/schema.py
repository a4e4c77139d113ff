"""OpenAPI building blocks that every app's schema module shares: the headers that many
operations carry, and the error responses, whose examples come from the catalogue of error codes
(embedplatform/error_codes.py), the same entries the raise sites use."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse

from embedplatform.error_codes import CATALOGUE
from embedplatform.errors import ErrorSerializer

STATUS_DESCRIPTIONS = {
    400: "The body is not valid JSON (or not UTF-8), or not a JSON object.",
    401: "No credential, or one that is malformed, invalid, expired or revoked; `code` says which.",
    403: "The credential is good but may not do this: not a member of the `X-Tenant` tenant, an "
    "inactive tenant, or (browsable API) a missing CSRF token.",
    404: "The requested model is not the one this service serves.",
    413: "Too much at once: more texts than the tenant's maximum per request, or a body larger "
    "than the server accepts (`DATA_UPLOAD_MAX_MEMORY_SIZE`).",
    415: "The body is not `application/json`.",
    422: "A field is missing or invalid; `param` names it.",
    429: "The tenant's per-minute request or token limit is reached (`type` "
    "`rate_limit_exceeded`, see `Retry-After`), or its monthly token quota is spent "
    "(`insufficient_quota`).",
    503: "Not ready: the model is still loading or overloaded, or rate limiting or the signing "
    "keys are unavailable. Try again shortly.",
}


def error_responses(*codes: str) -> dict[int, OpenApiResponse]:
    """One response per status among `codes`, each with the catalogue's example of every code."""
    by_status: dict[int, list[OpenApiExample]] = {}
    for code in codes:
        entry = CATALOGUE[code]
        example = OpenApiExample(entry.title, value=entry.example_body())
        by_status.setdefault(entry.status, []).append(example)
    return {
        status: OpenApiResponse(
            response=ErrorSerializer, description=STATUS_DESCRIPTIONS[status], examples=examples
        )
        for status, examples in sorted(by_status.items())
    }


def response_header(
    name: str,
    kind: Any,
    description: str,
    statuses: list[int] | bool = True,
    *,
    always: bool = False,
) -> OpenApiParameter:
    return OpenApiParameter(
        name,
        kind,
        OpenApiParameter.HEADER,
        response=statuses,
        required=always,
        description=description,
    )


REQUEST_ID_IN = OpenApiParameter(
    "X-Request-ID",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description="Your own id for this request (1-128 of `A-Z a-z 0-9 . _ : -`): echoed in "
    "`x-request-id` and stored in the usage log. Otherwise the service makes one.",
)
REQUEST_ID_OUT_DESCRIPTION = (
    "This request's id, as in the usage log and the service's logs: quote it when reporting "
    "a problem."
)
REQUEST_ID_OUT = response_header(
    "x-request-id", OpenApiTypes.STR, REQUEST_ID_OUT_DESCRIPTION, always=True
)
X_TENANT = OpenApiParameter(
    "X-Tenant",
    # A header is text: an id in digits, or empty (the same as no header).
    {"type": "string", "pattern": r"^\s*[0-9]*\s*$"},
    OpenApiParameter.HEADER,
    description="The id of the tenant to act for, when the user belongs to several (see "
    "`GET /usage`). Without it (or empty) the user's default tenant is used. A user who is not "
    "a member gets 403 `not_a_member`; an API key acts only for its own tenant (403 "
    "`tenant_mismatch`).",
)
WWW_AUTHENTICATE = response_header(
    "WWW-Authenticate", OpenApiTypes.STR, 'The challenge: `Bearer realm="api"`.', [401]
)
SERVER_TIMING = response_header(
    "Server-Timing",
    OpenApiTypes.STR,
    "Where the time went (authentication, waiting for the model, the model, ...), in the W3C "
    "Server-Timing format that browsers' developer tools show.",
)
_RATE_LIMITED = [200, 429]
RATE_LIMIT_HEADERS = [
    response_header(name, kind, description, _RATE_LIMITED)
    for name, kind, description in (
        (
            "x-ratelimit-limit-requests",
            OpenApiTypes.INT,
            "Requests per minute the tenant may make.",
        ),
        (
            "x-ratelimit-remaining-requests",
            OpenApiTypes.INT,
            "Requests left in this minute's window.",
        ),
        (
            "x-ratelimit-reset-requests",
            OpenApiTypes.STR,
            "Time until the request window resets, e.g. `42s`.",
        ),
        ("x-ratelimit-limit-tokens", OpenApiTypes.INT, "Tokens per minute the tenant may embed."),
        ("x-ratelimit-remaining-tokens", OpenApiTypes.INT, "Tokens left in this minute's window."),
        (
            "x-ratelimit-reset-tokens",
            OpenApiTypes.STR,
            "Time until the token window resets, e.g. `42s`.",
        ),
    )
]
RATE_LIMIT_HEADERS.append(
    response_header("Retry-After", OpenApiTypes.INT, "Seconds to wait before trying again.", [429])
)
