"""Verification of Supabase access tokens (minimal HS256 version; to be extended with JWKS)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jwt as pyjwt
from django.conf import settings
from rest_framework.exceptions import AuthenticationFailed


@dataclass(frozen=True)
class SupabaseClaims:
    subject: str
    email: str
    role: str
    is_anonymous: bool
    claims: dict[str, Any] = field(default_factory=dict)


def verify_supabase_token(token: str) -> SupabaseClaims:
    try:
        claims = pyjwt.decode(
            token,
            settings.SUPABASE_JWT_SECRET,
            algorithms=["HS256"],
            audience=settings.SUPABASE_JWT_AUDIENCE,
            leeway=settings.SUPABASE_JWT_LEEWAY_SECONDS,
            options={"require": ["exp", "sub"]},
        )
    except pyjwt.ExpiredSignatureError as exc:
        raise AuthenticationFailed("The token has expired.", code="token_expired") from exc
    except pyjwt.InvalidTokenError as exc:
        raise AuthenticationFailed(f"Invalid token: {exc}", code="invalid_token") from exc
    if claims.get("role") != "authenticated":
        raise AuthenticationFailed("The token is not a user's token.", code="invalid_role")
    return SupabaseClaims(
        subject=str(claims["sub"]),
        email=str(claims.get("email") or ""),
        role=str(claims.get("role")),
        is_anonymous=bool(claims.get("is_anonymous", False)),
        claims=claims,
    )


def mint_token(
    *, subject: str, email: str, lifetime_seconds: int = 3600, extra: dict[str, Any] | None = None
) -> str:
    """An HS256 access token shaped exactly like Supabase's, signed with SUPABASE_JWT_SECRET."""
    import time

    now = int(time.time())
    issuer = f"{settings.SUPABASE_URL}/auth/v1" if settings.SUPABASE_URL else "embedplatform-dev"
    payload: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": "authenticated",
        "exp": now + lifetime_seconds,
        "iat": now,
        "email": email,
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {},
        "role": "authenticated",
        "aal": "aal1",
        "amr": [{"method": "password", "timestamp": now}],
        "session_id": "00000000-0000-0000-0000-000000000000",
        "is_anonymous": False,
    }
    payload.update(extra or {})
    return pyjwt.encode(payload, settings.SUPABASE_JWT_SECRET, algorithm="HS256")
