"""The catalogue of error codes: for every `code` the API answers with, its HTTP status, its type
and the message templates it is raised with.

Raise sites take their message from here (`CATALOGUE["empty_text"].message()`, or
`.error(...)` for the exception), and the OpenAPI document's error examples are rendered from
the same entries, so the two cannot drift; tests/test_errors.py checks that every code raised in
the source is catalogued and that its literal message matches a template here.

A template is a `str.format` string; `example` holds the values the documentation shows. A code
raised in more than one situation has one template per wording, the documented one first.
Plain data, no Django import: settings.py builds the /metrics part of the schema from it. Over
400 lines only because it is one flat table of every code; splitting it would defeat its purpose.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Error types, following OpenAI's names where it has one.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_exceeded"
INSUFFICIENT_QUOTA = "insufficient_quota"
SERVICE_UNAVAILABLE = "service_unavailable"
SERVER_ERROR = "server_error"
ERROR_TYPES = (
    INVALID_REQUEST,
    AUTHENTICATION,
    PERMISSION,
    NOT_FOUND,
    RATE_LIMIT,
    INSUFFICIENT_QUOTA,
    SERVICE_UNAVAILABLE,
    SERVER_ERROR,
)


def error_body(
    message: str, *, error_type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The one error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


FIELD_PREFIX = "{param}: "


@dataclass(frozen=True)
class ErrorCode:
    code: str
    status: int
    type: str
    title: str  # the example's name in the docs
    messages: tuple[str, ...]
    example: Mapping[str, Any] = field(default_factory=dict)  # "param" fills the param field

    def message(self, variant: int = 0, **values: Any) -> str:
        return self.messages[variant].format(**values)

    def detail(self, variant: int = 0, **values: Any) -> str:
        """A field error's own text, for a serializer's ValidationError: the message without the
        "<param>: " that the exception handler puts in front."""
        return self.messages[variant].removeprefix(FIELD_PREFIX).format(**values)

    def body(self, *, param: str | None = None, variant: int = 0, **values: Any) -> dict[str, Any]:
        message = self.message(variant, param=param, **values)
        return error_body(message, error_type=self.type, code=self.code, param=param)

    def example_body(self) -> dict[str, Any]:
        return self.body(**self.example)

    def error(
        self,
        *,
        param: str | None = None,
        variant: int = 0,
        headers: dict[str, str] | None = None,
        **values: Any,
    ) -> Exception:
        """The exception to raise; the exception handler turns it into `body()`."""
        from embedplatform.errors import exception_for  # DRF is imported only when raising

        message = self.message(variant, param=param, **values)
        return exception_for(self, message, param=param, headers=headers)

    def pattern(self, variant: int) -> re.Pattern[str]:
        """The template as a regular expression: each placeholder matches any text."""
        parts = []
        for literal, name, _spec, _conversion in string.Formatter().parse(self.messages[variant]):
            parts.append(re.escape(literal))
            if name is not None:
                parts.append("(.+?)")
        return re.compile("".join(parts), re.DOTALL)

    def matches(self, body: Mapping[str, Any]) -> bool:
        """Whether an answer's body is this code's, in one of its wordings."""
        error = body.get("error", {})
        if (error.get("code"), error.get("type")) != (self.code, self.type):
            return False
        message = str(error.get("message"))
        return any(self.pattern(i).fullmatch(message) for i in range(len(self.messages)))


def _entries(status: int, error_type: str, *entries: ErrorCode) -> list[ErrorCode]:
    return [ErrorCode(e.code, status, error_type, e.title, e.messages, e.example) for e in entries]


def _e(code: str, title: str, *messages: str, **example: Any) -> ErrorCode:
    return ErrorCode(code, 0, "", title, messages, example)


_INPUT = {"param": "input"}
_CODES = [
    *_entries(
        400,
        INVALID_REQUEST,
        _e(
            "invalid_json",
            "Invalid JSON",
            "The request body is not valid JSON: {reason}",
            "The request body is not valid JSON: it is nested too deeply.",
            reason="Expecting value: line 1 column 1 (char 0)",
        ),
        _e("invalid_encoding", "Not UTF-8", "The request body is not valid UTF-8."),
        _e("invalid_body", "Not an object", "The request body must be a JSON object."),
        _e("bad_request", "Not understood", "The request could not be understood."),
        _e(
            "malformed_request",
            "Unparsable HTTP",
            "The HTTP request could not be parsed: {reason}",
            reason="Invalid HTTP Version 'HTTP/9.9'",
        ),
        _e(
            "malformed_body",
            "Body cut short",
            "The request body could not be read: its chunked encoding is malformed or it ended "
            "before its declared length.",
        ),
    ),
    *_entries(
        401,
        AUTHENTICATION,
        _e("missing_credentials", "No credential", "Authentication credentials were not provided."),
        _e("invalid_credentials", "Bad credential", "Incorrect authentication credentials."),
        _e(
            "malformed_credentials",
            "Malformed header",
            "The Authorization header has no bearer credential.",
            "The bearer credential is not ASCII.",
            "The bearer credential must not contain spaces.",
        ),
        _e("credential_too_long", "Credential too long", "The bearer credential is too long."),
        _e(
            "malformed_api_key",
            "Malformed API key",
            "The API key is malformed; copy it whole, as it was shown when created.",
        ),
        _e("invalid_api_key", "Invalid API key", "Invalid API key."),
        _e("revoked_api_key", "Revoked API key", "This API key has been revoked."),
        _e("expired_api_key", "Expired API key", "This API key has expired."),
        _e("user_inactive", "Disabled user", "This user is disabled."),
        _e(
            "token_expired",
            "Expired token",
            "The token has expired; get a new one (log in again).",
        ),
        _e(
            "malformed_token",
            "Not a JWT",
            "The bearer credential is neither an API key nor a JWT (three base64url parts "
            "separated by dots).",
            "The token is not a well-formed JWT.",
            "The token's header is not valid base64url-encoded JSON.",
            "The token's header names no signing algorithm.",
        ),
        _e(
            "unsupported_algorithm",
            "Unsupported algorithm",
            "Tokens signed with {alg} are not accepted; Supabase tokens are signed with HS256, "
            "ES256 or RS256.",
            "Unsigned tokens (alg none) are not accepted.",
            "HS256 tokens are not accepted: this service verifies only the project's asymmetric "
            "keys.",
            "{alg} tokens are not accepted: no Supabase project keys (SUPABASE_URL) are "
            "configured.",
            alg="HS512",
        ),
        _e(
            "unknown_signing_key",
            "Unknown signing key",
            "The token was signed with a key the Supabase project does not publish.",
            "The token does not say which key signed it (no kid).",
        ),
        _e(
            "algorithm_mismatch",
            "Algorithm mismatch",
            "The token claims {alg} but its key is a {key_alg} key.",
            "The token's algorithm does not match its key.",
            alg="RS256",
            key_alg="ES256",
        ),
        _e(
            "invalid_signature",
            "Invalid signature",
            "The token's signature is not valid.",
            "The token cannot be verified with this service's keys.",
        ),
        _e(
            "token_not_yet_valid",
            "Not valid yet",
            "The token is not valid yet (nbf or iat is in the future).",
        ),
        _e("missing_claim", "Missing claim", "The token has no {claim} claim.", claim="exp"),
        _e("invalid_token", "Invalid claims", "The token's claims are not valid."),
        _e(
            "invalid_audience",
            "Wrong audience",
            "The token is not meant for this service (aud is not {audience!r}).",
            "The token has no audience (aud).",
            audience="authenticated",
        ),
        _e(
            "invalid_issuer",
            "Wrong issuer",
            "The token was not issued by this service's Supabase project.",
        ),
        _e(
            "invalid_role",
            "Wrong role",
            "The token's role must be {role!r}.",
            role="authenticated",
        ),
        _e(
            "not_a_user_token",
            "Project key, not a user token",
            "This is the Supabase project's {role} key, not a user's access token; log in and "
            "send the access token you get.",
            "This is a Supabase project API key, not a user's access token.",
            role="service_role",
        ),
        _e("missing_subject", "No subject", "The token names no user (no sub)."),
        _e(
            "invalid_subject",
            "Subject not storable",
            "The token's subject (sub) is too long.",
            "The token's subject (sub) contains control characters.",
        ),
        _e(
            "invalid_email",
            "Email not storable",
            "The token's email contains control characters.",
        ),
        _e(
            "anonymous_user_not_allowed",
            "Anonymous user",
            "Anonymous Supabase users may not use this service; sign in with an account.",
        ),
        _e(
            "invalid_metrics_token",
            "Missing or wrong metrics token",
            "GET /metrics needs `Authorization: Bearer <METRICS_TOKEN>`.",
        ),
    ),
    *_entries(
        403,
        PERMISSION,
        _e(
            "not_a_member",
            "Not a member",
            "You are not a member of tenant {tenant!r} (X-Tenant takes the id of a tenant you "
            "belong to).",
            tenant="42",
        ),
        _e(
            "tenant_inactive",
            "Tenant inactive",
            "This tenant is inactive; ask its owner or the operators to reactivate it.",
        ),
        _e(
            "tenant_mismatch",
            "API key for another tenant",
            "An API key acts only for its own tenant; drop the X-Tenant header or send its "
            "tenant's id.",
        ),
        _e(
            "permission_denied",
            "CSRF (staff session)",
            "CSRF Failed: {reason}",
            "You do not have permission to perform this action.",
            reason="CSRF token missing.",
        ),
        _e("forbidden", "Forbidden", "You do not have permission to do this."),
        _e(
            "invalid_tenant",
            "Control characters in X-Tenant",
            "The X-Tenant header holds control characters; it takes the id of a tenant you "
            "belong to.",
        ),
    ),
    *_entries(
        404,
        NOT_FOUND,
        _e(
            "model_not_found",
            "Unknown model",
            "The model {model!r} does not exist here; this service serves {served!r}.",
            model="text-embedding-3-small",
            served="google/embeddinggemma-300m",
            param="model",
        ),
        _e("not_found", "Unknown path", "No such endpoint: {path}", "Not found.", path="/embedd"),
    ),
    *_entries(
        405,
        INVALID_REQUEST,
        _e(
            "method_not_allowed",
            "Wrong method",
            'Method "{method}" not allowed.',
            "Method {method} is not allowed on /metrics; use GET.",
            method="PUT",
        ),
    ),
    *_entries(
        406,
        INVALID_REQUEST,
        _e(
            "not_acceptable",
            "Unacceptable Accept header",
            "Could not satisfy the request Accept header.",
        ),
    ),
    *_entries(
        413,
        INVALID_REQUEST,
        _e(
            "too_many_inputs",
            "Too many texts",
            "A request may carry at most {limit} texts; this one has {count}.",
            limit=256,
            count=300,
            param="texts",
        ),
        _e(
            "request_too_large",
            "Body too large",
            "The request body is larger than the {limit} bytes the server accepts.",
            limit=4194304,
        ),
    ),
    *_entries(
        414,
        INVALID_REQUEST,
        _e(
            "request_line_too_long",
            "Request line too long",
            "The request line is longer than the server accepts: {reason}",
            reason="limit request line size",
        ),
    ),
    *_entries(
        415,
        INVALID_REQUEST,
        _e(
            "unsupported_media_type",
            "Not JSON",
            'Unsupported media type "{media_type}" in request.',
            media_type="text/plain",
        ),
    ),
    *_entries(
        417,
        INVALID_REQUEST,
        _e(
            "expectation_failed",
            "Unknown Expect",
            "The request's Expect header cannot be met: {reason}",
            reason="Unknown value for Expect: 'x'",
        ),
    ),
    *_entries(
        422,
        INVALID_REQUEST,
        # Field errors read "<param>: <what is wrong>".
        _e(
            "empty_text",
            "Empty text",
            "{param}: Text must not be empty or whitespace only.",
            "input[{position}] decodes to empty text.",
            param="text",
        ),
        _e(
            "surrogate_characters_not_allowed",
            "Lone surrogate",
            "{param}: Text contains a lone surrogate (invalid Unicode).",
            param="text",
        ),
        _e(
            "invalid",
            "Wrong type",
            "{param}: Not a valid string.",
            "{param}: A valid integer is required.",
            "{param}: Must be a valid boolean.",
            "{param}: Input must be a string, an array of strings, an array of token ids or an "
            "array of token-id arrays.",
            "{param}: Inputs must be a string or an array of strings.",
            "{param}: Ids must be an array of token ids or an array of token-id arrays.",
            param="text",
        ),
        _e("required", "Missing field", "{param}: This field is required.", param="text"),
        _e("null", "Null field", "{param}: This field may not be null.", param="text"),
        _e("empty", "Empty list", "{param}: Input must not be empty.", **_INPUT),
        _e(
            "mixed",
            "Mixed input",
            "{param}: Input arrays must hold only strings or only token ids.",
            **_INPUT,
        ),
        _e(
            "not_a_list",
            "Not a list",
            '{param}: Expected a list of items but got type "{input_type}".',
            param="texts",
            input_type="str",
        ),
        _e(
            "min_value",
            "Too small",
            "{param}: Ensure this value is greater than or equal to {limit}.",
            param="dimensions",
            limit=1,
        ),
        _e(
            "max_length",
            "Too long",
            "{param}: Ensure this field has no more than {limit} characters.",
            param="prompt_name",
            limit=64,
        ),
        _e(
            "invalid_choice",
            "Not a choice",
            '{param}: "{value}" is not a valid choice.',
            param="encoding_format",
            value="int8",
        ),
        _e(
            "input_too_long",
            "Input too long",
            "{param}: This input has {tokens} tokens; the model reads at most {limit} tokens per "
            "input. Shorten it, or send truncate: true to have it cut.",
            param="texts[1]",
            tokens=3120,
            limit=2048,
        ),
        _e(
            "invalid_dimensions",
            "Unsupported dimensions",
            "dimensions must be between 1 and {native} for this model, not {dimensions}.",
            native=768,
            dimensions=1024,
            param="dimensions",
        ),
        _e(
            "invalid_prompt_name",
            "Unknown prompt",
            "Unknown prompt_name {prompt_name!r}; this model's prompts are: {names}.",
            prompt_name="qa",
            names="Classification, Clustering, STS, document, query",
            param="prompt_name",
        ),
        _e(
            "invalid_token_id",
            "Token id out of range",
            "input[{position}] holds {token_id}, which is not a cl100k_base token id (token "
            "arrays are read as OpenAI's tiktoken ids; TOKEN_ID_INPUT=native reads them as the "
            "served model's).",
            "input[{position}] holds a token id outside this model's vocabulary (0-{last}).",
            "{param}: Token id {token_id} is outside this model's vocabulary (0-{last}).",
            position=0,
            token_id=100256,
            last=262143,
            **_INPUT,
        ),
    ),
    *_entries(
        429,
        RATE_LIMIT,
        _e(
            "rate_limit_exceeded",
            "Rate limit",
            "Rate limit of {limit} requests per minute reached; retry in {retry_after} s.",
            "Rate limit of {limit} tokens per minute reached; retry in {retry_after} s.",
            "This request has {tokens} tokens, more than the tenant's limit of {limit} tokens "
            "per minute; send fewer texts at once.",
            limit=60,
            retry_after=17,
            tokens=12000,
        ),
        _e(
            "too_many_texts_in_flight",
            "Too many texts waiting",
            "This tenant already has {waiting} texts waiting for the model on this server; at "
            "most {limit} may wait at once. Retry shortly, or send fewer requests at a time.",
            waiting=512,
            limit=512,
        ),
    ),
    *_entries(
        429,
        INSUFFICIENT_QUOTA,
        _e(
            "insufficient_quota",
            "Monthly quota",
            "This request needs {tokens} tokens but only {remaining} of the tenant's monthly "
            "quota of {quota} remain.",
            tokens=12,
            remaining=3,
            quota=10000000,
        ),
    ),
    *_entries(
        431,
        INVALID_REQUEST,
        _e(
            "request_headers_too_large",
            "Headers too large",
            "The request's headers are larger than the server accepts: {reason}",
            reason="Error parsing headers: 'limit request headers fields size'",
        ),
    ),
    *_entries(
        503,
        SERVICE_UNAVAILABLE,
        _e("model_not_ready", "Model loading", "The model is not loaded yet."),
        _e("model_overloaded", "Overloaded", "The model is overloaded; try again shortly."),
        _e(
            "rate_limit_unavailable",
            "Rate limiting down",
            "Rate limiting is unavailable; try again shortly.",
        ),
        _e(
            "jwks_unavailable",
            "Signing keys unavailable",
            "The Supabase project's signing keys cannot be fetched right now; try again shortly.",
        ),
        _e("not_ready", "Not ready", "Not ready: {failing}.", failing="model"),
        _e(
            "shutting_down",
            "Shutting down",
            "This server is shutting down; retry and another will answer.",
        ),
    ),
    *_entries(
        501,
        INVALID_REQUEST,
        _e(
            "unsupported_transfer_coding",
            "Unknown transfer coding",
            "The request's Transfer-Encoding is not supported: {reason}",
            reason="Unsupported transfer coding: 'gzip'",
        ),
    ),
    *_entries(
        500,
        SERVER_ERROR,
        _e("internal_error", "Server error", "The server failed to process the request."),
    ),
]
CATALOGUE: dict[str, ErrorCode] = {entry.code: entry for entry in _CODES}
assert len(CATALOGUE) == len(_CODES), "an error code is catalogued twice"
