"""One error shape for every failure the API can return.

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

It is the shape OpenAI uses, so the `openai` client turns our errors into its own exceptions with
our message. Status codes: 400 malformed body, 401 missing or bad credential, 403 not allowed,
404 unknown path or model, 405 wrong method, 413 too large, 415 not JSON, 422 invalid field,
429 rate limit or quota, 503 not ready, 500 a bug of ours (logged with its traceback).
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response

# Re-exported: the types and the shape are defined with the catalogue of codes.
from embedplatform.error_codes import (
    AUTHENTICATION,
    CATALOGUE,
    ERROR_TYPES,
    INSUFFICIENT_QUOTA,
    INVALID_REQUEST,
    NOT_FOUND,
    PERMISSION,
    RATE_LIMIT,
    SERVER_ERROR,  # noqa: F401  (re-exported)
    SERVICE_UNAVAILABLE,
    ErrorCode,
    error_body,
)

logger = logging.getLogger(__name__)


class ErrorDetailSerializer(serializers.Serializer):
    message = serializers.CharField(help_text="What went wrong, for a person to read.")
    type = serializers.ChoiceField(
        choices=ERROR_TYPES, help_text="The kind of error (OpenAI's names where it has one)."
    )
    param = serializers.CharField(
        allow_null=True,
        help_text="The request field at fault (`text`, `texts[2]`, `input`, `dimensions`, ...), "
        "or null.",
    )
    code = serializers.CharField(
        allow_null=True,
        help_text="A stable code for programs: `empty_text`, `invalid_api_key`, "
        "`rate_limit_exceeded`, `insufficient_quota`, `model_not_ready`, ... (see the README's "
        "list of error codes).",
    )


class ErrorSerializer(serializers.Serializer):
    """The one shape of every error (OpenAI's)."""

    error = ErrorDetailSerializer(help_text="What went wrong.")


class ApiError(exceptions.APIException):
    """An error with its type, code and offending parameter spelled out."""

    error_type = INVALID_REQUEST

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        param: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail=message, code=code)
        if status_code is not None:
            self.status_code = status_code
        self.code = code
        self.param = param
        if error_type is not None:
            self.error_type = error_type
        self.headers = headers or {}


class InvalidField(ApiError):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY


class PayloadTooLarge(ApiError):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE


class ModelNotFound(ApiError):
    status_code = status.HTTP_404_NOT_FOUND
    error_type = NOT_FOUND


class ServiceUnavailable(ApiError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    error_type = SERVICE_UNAVAILABLE


class ModelOverloaded(ServiceUnavailable):
    """The worker's queue is full: refused at once, with when to come back."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(
            message, code="model_overloaded", headers={"Retry-After": str(max(1, retry_after))}
        )


class RateLimitExceeded(ApiError):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    error_type = RATE_LIMIT


class QuotaExceeded(ApiError):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    error_type = INSUFFICIENT_QUOTA


def exception_for(
    entry: ErrorCode, message: str, *, param: str | None, headers: dict[str, str] | None
) -> exceptions.APIException:
    """The exception that `entry` is raised as (see ErrorCode.error): DRF's own for 400, 401
    and 403, whose handling (the 401 challenge, authentication's 403 fallback) depends on them."""
    drf_classes: dict[int, type[exceptions.APIException]] = {
        400: exceptions.ParseError,
        401: exceptions.AuthenticationFailed,
        403: exceptions.PermissionDenied,
    }
    if entry.status in drf_classes and param is None and not headers:
        return drf_classes[entry.status](message, code=entry.code)
    # The specific class where there is one: callers catch QuotaExceeded, for instance.
    klass = next(
        (
            k
            for k in (
                InvalidField,
                PayloadTooLarge,
                ModelNotFound,
                ServiceUnavailable,
                RateLimitExceeded,
                QuotaExceeded,
            )
            if (k.status_code, k.error_type) == (entry.status, entry.type)
        ),
        ApiError,
    )
    return klass(
        message,
        status_code=entry.status,
        code=entry.code,
        param=param,
        error_type=entry.type,
        headers=headers,
    )


# Answered 400 on OpenAI's API (/v1/embeddings), as OpenAI does for every invalid request; the
# original API keeps its 422 and 413. A body over the size limit stays 413 everywhere: it is
# refused by the transport's rule, not read as a request at all.
OPENAI_AS_BAD_REQUEST = frozenset({"too_many_inputs"})


def openai_status(status_code: int, body: Any) -> int:
    """The status OpenAI's API gives the error the original API answers with `status_code`."""
    code = body.get("error", {}).get("code") if isinstance(body, dict) else None
    if status_code == status.HTTP_422_UNPROCESSABLE_ENTITY or code in OPENAI_AS_BAD_REQUEST:
        return status.HTTP_400_BAD_REQUEST
    return status_code


def request_too_large() -> PayloadTooLarge:
    """The one 413 for a body over DATA_UPLOAD_MAX_MEMORY_SIZE, wherever it is noticed."""
    from django.conf import settings

    error = CATALOGUE["request_too_large"].error(limit=settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
    assert isinstance(error, PayloadTooLarge)
    return error


def _first_validation_error(detail: Any, path: str = "") -> tuple[str | None, str, str | None]:
    """Serializer errors nest; callers want the first one as (param, message, code)."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            if key == "non_field_errors":
                name = path
            elif isinstance(key, int):  # ListField reports items by position
                name = f"{path}[{key}]"
            else:
                name = f"{path}.{key}" if path else str(key)
            return _first_validation_error(value, name)
    if isinstance(detail, list) and detail:
        for index, value in enumerate(detail):
            if isinstance(value, list | dict):
                nested = f"{path}[{index}]" if path else f"[{index}]"
                return _first_validation_error(value, nested)
        return _first_validation_error(detail[0], path)
    if isinstance(detail, exceptions.ErrorDetail):
        return path or None, str(detail), detail.code
    return path or None, str(detail), None


_DEFAULTS: dict[type[exceptions.APIException], tuple[str, str]] = {
    exceptions.NotAuthenticated: (AUTHENTICATION, "missing_credentials"),
    exceptions.AuthenticationFailed: (AUTHENTICATION, "invalid_credentials"),
    exceptions.PermissionDenied: (PERMISSION, "permission_denied"),
    exceptions.NotFound: (NOT_FOUND, "not_found"),
    exceptions.MethodNotAllowed: (INVALID_REQUEST, "method_not_allowed"),
    exceptions.NotAcceptable: (INVALID_REQUEST, "not_acceptable"),
    exceptions.UnsupportedMediaType: (INVALID_REQUEST, "unsupported_media_type"),
    exceptions.ParseError: (INVALID_REQUEST, "invalid_json"),
}


def describe(exc: exceptions.APIException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) for any DRF exception."""
    headers: dict[str, str] = {}
    if isinstance(exc, ApiError):
        body = error_body(
            str(exc.detail), error_type=exc.error_type, code=exc.code, param=exc.param
        )
        return exc.status_code, body, dict(exc.headers)
    if isinstance(exc, exceptions.ValidationError):
        param, message, code = _first_validation_error(exc.detail)
        if param and not message.startswith(param):
            message = f"{param}: {message}"
        body = error_body(message, error_type=INVALID_REQUEST, code=code or "invalid", param=param)
        return status.HTTP_422_UNPROCESSABLE_ENTITY, body, headers
    error_type, code = INVALID_REQUEST, None
    for klass, (default_type, default_code) in _DEFAULTS.items():
        if isinstance(exc, klass):
            error_type, code = default_type, default_code
            break
    detail_code = getattr(exc.detail, "code", None)
    if detail_code and detail_code not in {exc.default_code, "invalid"}:
        code = detail_code
    if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
        headers["WWW-Authenticate"] = 'Bearer realm="api"'
        # DRF downgrades 401 to 403 when no authenticator names a scheme; we always have one.
        exc.status_code = status.HTTP_401_UNAUTHORIZED
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return exc.status_code, error_body(detail, error_type=error_type, code=code), headers


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF's EXCEPTION_HANDLER: every exception a view raises leaves as the common shape."""
    # Imported here: rest_framework.views imports the authentication classes, which import us.
    from rest_framework.views import set_rollback

    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, RequestDataTooBig):
        exc = request_too_large()
    if not isinstance(exc, exceptions.APIException):
        view = context.get("view")
        logger.exception("unhandled_error", extra={"view": type(view).__name__})
        set_rollback()
        return Response(SERVER_ERROR_BODY, status=status.HTTP_500_INTERNAL_SERVER_ERROR)
    status_code, body, headers = describe(exc)
    set_rollback()
    return Response(body, status=status_code, headers=headers)


def json_error(
    status_code: int,
    message: str,
    *,
    error_type: str,
    code: str,
    headers: dict[str, str] | None = None,
) -> JsonResponse:
    """The common shape for plain Django views and handlers, outside DRF."""
    body = error_body(message, error_type=error_type, code=code)
    return JsonResponse(body, status=status_code, headers=headers)


def catalogued_error(
    code: str, *, headers: dict[str, str] | None = None, **values: Any
) -> JsonResponse:
    """A catalogued error as a plain Django response (outside DRF views)."""
    entry = CATALOGUE[code]
    return JsonResponse(entry.body(**values), status=entry.status, headers=headers)


def api_error_response(exc: exceptions.APIException) -> JsonResponse:
    """An API error as a plain Django response, for code outside DRF views."""
    status_code, body, headers = describe(exc)
    return JsonResponse(body, status=status_code, headers=headers)


SERVER_ERROR_BODY = CATALOGUE["internal_error"].body()


# Django-level handlers for requests that never reach a DRF view (unknown paths, middleware errors).
def bad_request(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    if isinstance(exception, RequestDataTooBig):
        return api_error_response(request_too_large())
    return catalogued_error("bad_request")


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return catalogued_error("forbidden")


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return catalogued_error("not_found", path=request.path)


def server_error(request: HttpRequest) -> JsonResponse:
    return JsonResponse(SERVER_ERROR_BODY, status=500)
