"""DRF authentication classes: tenant API keys, Supabase access tokens and staff sessions.

Each returns `(user, Caller)` on success, `None` when the request carries another kind of
credential (so the next class can try), and raises AuthenticationFailed for a credential of its
kind that is bad, as DRF's own TokenAuthentication does. A request with no bearer credential at
all, or another scheme (Basic, Token), is simply unauthenticated: the permission check then
answers 401 `missing_credentials`.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AnonymousUser
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from accounts import services
from accounts.jwt import MAX_TOKEN_LENGTH, verify_supabase_token
from accounts.selectors import membership_for, supabase_membership, tenant_id_from
from accounts.services import Caller

WWW_AUTHENTICATE = 'Bearer realm="api"'
TENANT_HEADER = "HTTP_X_TENANT"


def requested_tenant(request: Request) -> str | None:
    """What the X-Tenant header asks for, if anything."""
    return request.META.get(TENANT_HEADER, "").strip() or None


def has_control_characters(value: str) -> bool:
    # NUL cannot be stored by PostgreSQL at all; no control character belongs in a tenant ref.
    return any(ord(char) < 32 or ord(char) == 127 for char in value)


def with_tenant(caller: Caller, request: Request) -> Caller:
    """Decides the tenant a request acts for, once, as part of authentication: an API key's own
    tenant; for a user, the tenant named by `X-Tenant` (its id) when the user is a member of it,
    else the user's default tenant. An X-Tenant the caller may not act for becomes
    `caller.refusal` (403), raised by the permission check."""
    requested = requested_tenant(request)
    if caller.api_key is not None:
        caller.tenant = caller.api_key.tenant
    if requested is not None and has_control_characters(requested):
        # Refused before it reaches any query: no tenant id holds one (PostgreSQL cannot even
        # store NUL).
        caller.refusal = exceptions.PermissionDenied(
            "The X-Tenant header holds control characters; it takes the id of a tenant you "
            "belong to.",
            code="invalid_tenant",
        )
        return caller
    if caller.api_key is not None:
        # Read as a user's X-Tenant is ("007" is tenant 7), so both kinds of caller agree.
        if requested and tenant_id_from(requested) != caller.api_key.tenant_id:
            caller.refusal = exceptions.PermissionDenied(
                "An API key acts only for its own tenant; drop the X-Tenant header or send its "
                "tenant's id.",
                code="tenant_mismatch",
            )
        return caller
    if caller.tenant is not None:
        return caller  # found with the user (supabase_membership)
    user = caller.user
    assert user is not None, "authentication gives every caller without an API key its user"
    membership = membership_for(user=user, tenant_ref=requested)
    if membership is not None:
        caller.tenant = membership.tenant
    elif requested:
        caller.refusal = exceptions.PermissionDenied(
            f"You are not a member of tenant {requested[:40]!r} (X-Tenant takes the id of a "
            "tenant you belong to).",
            code="not_a_member",
        )
    else:
        # A user with no membership at all (an admin removed it): a personal tenant again.
        caller.tenant = services.ensure_personal_tenant(user=user)
    return caller


def bearer_credential(request: Request) -> str | None:
    """The bearer credential, None for other schemes, AuthenticationFailed when malformed."""
    header: str | bytes = request.META.get("HTTP_AUTHORIZATION", "")
    if isinstance(header, str):
        # WSGI hands headers over as latin-1 text; Django's test client may pass anything.
        try:
            header = header.encode("latin-1")
        except UnicodeEncodeError as exc:
            raise exceptions.AuthenticationFailed(
                "The bearer credential is not ASCII.", code="malformed_credentials"
            ) from exc
    if not header:
        return None
    scheme, _, rest = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    credential = rest.strip()
    if not credential:
        raise exceptions.AuthenticationFailed(
            "The Authorization header has no bearer credential.", code="malformed_credentials"
        )
    if len(credential) > MAX_TOKEN_LENGTH:
        raise exceptions.AuthenticationFailed(
            "The bearer credential is too long.", code="credential_too_long"
        )
    if any(byte in credential for byte in b" \t"):
        raise exceptions.AuthenticationFailed(
            "The bearer credential must not contain spaces.", code="malformed_credentials"
        )
    try:
        return credential.decode("ascii")
    except UnicodeDecodeError as exc:
        raise exceptions.AuthenticationFailed(
            "The bearer credential is not ASCII.", code="malformed_credentials"
        ) from exc


class ApiKeyUser(AnonymousUser):
    """Stands in for `request.user` when a tenant's API key calls: authenticated, but not a
    person, not staff and without permissions of its own."""

    def __init__(self, api_key: Any) -> None:
        self.api_key = api_key

    # [override]: django-stubs type AnonymousUser's flags as Literal[True] / Literal[False].
    @property
    def is_anonymous(self) -> bool:  # type: ignore[override]
        return False

    @property
    def is_authenticated(self) -> bool:  # type: ignore[override]
        return True

    def __str__(self) -> str:
        return f"api-key:{self.api_key.prefix}"


class BearerAuthentication(authentication.BaseAuthentication):
    def authenticate_header(self, request: Request) -> str:
        # Makes DRF answer 401 with a challenge rather than 403.
        return WWW_AUTHENTICATE


class ApiKeyAuthentication(BearerAuthentication):
    def authenticate(self, request: Request) -> tuple[Any, Caller] | None:
        raw = bearer_credential(request)
        if raw is None or not services.looks_like_api_key(raw):
            return None
        if not services.is_well_formed_api_key(raw):
            raise exceptions.AuthenticationFailed(
                "The API key is malformed; copy it whole, as it was shown when created.",
                code="malformed_api_key",
            )
        api_key = services.find_api_key(raw_key=raw)
        if api_key is None:
            raise exceptions.AuthenticationFailed("Invalid API key.", code="invalid_api_key")
        if api_key.is_revoked:
            raise exceptions.AuthenticationFailed(
                "This API key has been revoked.", code="revoked_api_key"
            )
        if api_key.is_expired():
            raise exceptions.AuthenticationFailed(
                "This API key has expired.", code="expired_api_key"
            )
        services.touch_api_key(api_key=api_key)
        return ApiKeyUser(api_key), with_tenant(Caller(user=None, api_key=api_key), request)


class SupabaseJWTAuthentication(BearerAuthentication):
    def authenticate(self, request: Request) -> tuple[Any, Caller] | None:
        raw = bearer_credential(request)
        if raw is None or services.looks_like_api_key(raw):
            return None
        claims = verify_supabase_token(raw)
        # A known user's membership comes with the user in one query; the tenant is then
        # resolved already. Otherwise: a new user (created here), or a case for with_tenant.
        membership = supabase_membership(
            subject=claims.subject, tenant_ref=requested_tenant(request)
        )
        if membership is not None:
            user = membership.user
            services.note_sign_in(identity=user.supabase_identity, email=claims.email)
            caller = Caller(user=user, tenant=membership.tenant)
        else:
            user = services.provision_supabase_user(subject=claims.subject, email=claims.email)
            caller = Caller(user=user)
        if not user.is_active:
            raise exceptions.AuthenticationFailed("This user is disabled.", code="user_inactive")
        return user, with_tenant(caller, request)


class TenantSessionAuthentication(authentication.SessionAuthentication):
    """Staff in the browsable API, logged in through the admin; CSRF enforced as DRF does."""

    def authenticate(self, request: Request) -> tuple[Any, Caller] | None:
        user = getattr(request._request, "user", None)
        # Only staff sessions count; anybody else's session is no credential here, and is
        # answered 401 rather than a CSRF 403 that would suggest otherwise.
        if user is None or not user.is_active or not user.is_staff:
            return None
        self.enforce_csrf(request)
        return user, with_tenant(Caller(user=user), request)
