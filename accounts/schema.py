"""The accounts app in the OpenAPI document: how its authentication classes appear as security
schemes, and GET /usage."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension

from accounts.serializers import UsageSummarySerializer
from embedplatform.schema import (
    REQUEST_ID_IN,
    REQUEST_ID_OUT,
    WWW_AUTHENTICATE,
    X_TENANT,
    error_responses,
)

BEARER_DESCRIPTION = """\
Send `Authorization: Bearer <credential>`. The credential is either of:

* **A Supabase access token** (a JWT) of a logged-in user, as Supabase Auth hands it out. It is
  verified with the project's `SUPABASE_JWT_SECRET` (HS256) or the keys of the project's JWKS,
  and must be a user's token (audience and role `authenticated`, not expired). The first call
  creates the user and a personal tenant. A user acts for their default tenant, or for the
  tenant whose id the `X-Tenant` header names, when they are a member of it.
* **A tenant API key** (`emb_<prefix>_<secret>`), created in the admin and shown once. It acts
  for its own tenant only.

A missing, malformed, expired, revoked or invalid credential is answered 401 with
`WWW-Authenticate: Bearer realm="api"`; the error's `code` says which
(`missing_credentials`, `malformed_credentials`, `malformed_token`, `invalid_signature`,
`token_expired`, `invalid_audience`, `invalid_issuer`, `not_a_user_token`, `invalid_api_key`,
`revoked_api_key`, `expired_api_key`, ...)."""

SESSION_DESCRIPTION = """\
For staff in the browsable API: log in at `/admin/login/`, then open an endpoint in the browser.
The session cookie counts only for staff users, and every POST must carry the CSRF token
(`X-CSRFToken` header), as the browsable API's form does."""


class BearerScheme(OpenApiAuthenticationExtension):
    """Tenant API keys and Supabase access tokens arrive in the same header: one scheme, which
    describes both."""

    target_class = "accounts.authentication.ApiKeyAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "Supabase JWT or tenant API key",
            "description": BEARER_DESCRIPTION,
        }


class SupabaseBearerScheme(OpenApiAuthenticationExtension):
    """Covered by `bearerAuth`, which ApiKeyAuthentication (always beside it) registers."""

    target_class = "accounts.authentication.SupabaseJWTAuthentication"
    name: list[str] = []

    def get_security_requirement(self, auto_schema: Any) -> list[Any]:
        return []

    def get_security_definition(self, auto_schema: Any) -> list[Any]:
        return []


class StaffSessionScheme(OpenApiAuthenticationExtension):
    target_class = "accounts.authentication.TenantSessionAuthentication"
    name = "staffSession"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "apiKey",
            "in": "cookie",
            "name": settings.SESSION_COOKIE_NAME,
            "description": SESSION_DESCRIPTION,
        }


# Keyword arguments of @extend_schema on UsageView.
USAGE: dict[str, Any] = {
    "tags": ["Account"],
    "summary": "The tenant's usage",
    "description": "The calling tenant's plan and limits, this month's requests and tokens with "
    "the quota left, and the last 30 days day by day. Only the caller's own tenant (or the "
    "one `X-Tenant` names) is shown.",
    "parameters": [X_TENANT, REQUEST_ID_IN, REQUEST_ID_OUT, WWW_AUTHENTICATE],
    "responses": {
        200: UsageSummarySerializer,
        **error_responses(
            "missing_credentials",
            "invalid_signature",
            "token_expired",
            "invalid_api_key",
            "not_a_member",
            "tenant_inactive",
            "tenant_mismatch",
        ),
    },
}
