"""Verification of Supabase access tokens, and minting of tokens shaped exactly like them.

A Supabase project signs its users' access tokens either with its legacy shared secret (HS256,
SUPABASE_JWT_SECRET) or with an asymmetric key (ES256 or RS256) whose public half it publishes in
its JWKS (see accounts.jwks). Both are accepted side by side, each only with its own kind of key:
the token's `alg` picks the key source, and an asymmetric key's own algorithm must match the
token's, so a token can never get itself checked with the wrong kind of key (the HS/RS confusion
attack) or with none at all (`alg: none`).

Every rejection raises AuthenticationFailed (401) with a code of its own and a message that says
what is wrong with the token, never anything about the keys.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NoReturn

import jwt as pyjwt
from django.conf import settings
from jwt.exceptions import InvalidSubjectError
from rest_framework.exceptions import AuthenticationFailed

from accounts.credential_cache import remembered
from accounts.jwks import ASYMMETRIC_ALGORITHMS, JwksUnavailable, get_jwks_cache
from embedplatform.errors import ServiceUnavailable

# Supabase access tokens are 1-2 kB; API keys under 100 bytes. Refusing anything longer before
# decoding keeps a hostile header cheap.
MAX_TOKEN_LENGTH = 8192
# The subject becomes a unique column of at most 255 characters.
MAX_SUBJECT_LENGTH = 255
MAX_EMAIL_LENGTH = 254
# Supabase's own API keys (the new publishable and secret ones) are not JWTs at all.
SUPABASE_API_KEY_PREFIXES = ("sb_publishable_", "sb_secret_")
PROJECT_KEY_ROLES = frozenset({"anon", "service_role"})
USER_ROLE = "authenticated"
_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_PRINTABLE_ALG = re.compile(r"^[A-Za-z0-9]{1,16}$")
# Claims that become rows: PostgreSQL text cannot hold NUL and UTF-8 cannot encode a lone
# surrogate (both would be a 500), and no other control character belongs in an id or an address.
_UNSTORABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True)
class SupabaseClaims:
    subject: str
    email: str
    role: str
    is_anonymous: bool
    claims: dict[str, Any] = field(default_factory=dict)

    @property
    def expires_at(self) -> float | None:
        exp = self.claims.get("exp")
        return float(exp) if isinstance(exp, int | float) else None


def _reject(message: str, code: str) -> NoReturn:
    raise AuthenticationFailed(message, code=code)


def _reject_expired() -> NoReturn:
    _reject("The token has expired; get a new one (log in again).", "token_expired")


def _verification_key(header: dict[str, Any]) -> tuple[Any, str]:
    """The key that must have signed a token with this header, and its algorithm."""
    alg = header.get("alg")
    if not isinstance(alg, str):
        _reject("The token's header names no signing algorithm.", "malformed_token")
    if alg.lower() == "none":
        _reject("Unsigned tokens (alg none) are not accepted.", "unsupported_algorithm")
    if alg == "HS256":
        if not settings.SUPABASE_JWT_SECRET:
            _reject(
                "HS256 tokens are not accepted: this service verifies only the project's "
                "asymmetric keys.",
                "unsupported_algorithm",
            )
        return settings.SUPABASE_JWT_SECRET, alg
    if alg not in ASYMMETRIC_ALGORITHMS:
        shown = alg if _PRINTABLE_ALG.match(alg) else "this algorithm"
        _reject(
            f"Tokens signed with {shown} are not accepted; Supabase tokens are signed with "
            "HS256, ES256 or RS256.",
            "unsupported_algorithm",
        )
    jwks = get_jwks_cache()
    if jwks is None:
        _reject(
            f"{alg} tokens are not accepted: no Supabase project keys (SUPABASE_URL) are "
            "configured.",
            "unsupported_algorithm",
        )
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        _reject("The token does not say which key signed it (no kid).", "unknown_signing_key")
    try:
        key = jwks.signing_key(kid)
    except JwksUnavailable as exc:
        raise ServiceUnavailable(
            "The Supabase project's signing keys cannot be fetched right now; try again shortly.",
            code="jwks_unavailable",
        ) from exc
    if key is None:
        _reject(
            "The token was signed with a key the Supabase project does not publish.",
            "unknown_signing_key",
        )
    if key.algorithm_name != alg:
        _reject(
            f"The token claims {alg} but its key is a {key.algorithm_name} key.",
            "algorithm_mismatch",
        )
    return key, alg


def _decode(token: str, key: Any, alg: str) -> dict[str, Any]:
    issuer = f"{settings.SUPABASE_URL}/auth/v1" if settings.SUPABASE_URL else None
    try:
        claims = pyjwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=settings.SUPABASE_JWT_AUDIENCE,
            issuer=issuer,
            leeway=settings.SUPABASE_JWT_LEEWAY_SECONDS,
            options={"require": ["exp"]},
        )
    # InvalidSignatureError is a DecodeError, so it comes first.
    except pyjwt.InvalidSignatureError:
        _reject("The token's signature is not valid.", "invalid_signature")
    except pyjwt.ExpiredSignatureError:
        _reject_expired()
    except pyjwt.ImmatureSignatureError:
        _reject("The token is not valid yet (nbf or iat is in the future).", "token_not_yet_valid")
    except (pyjwt.InvalidAudienceError, pyjwt.InvalidIssuerError) as exc:
        _reject_audience_or_issuer(token, exc)
    except pyjwt.MissingRequiredClaimError as exc:
        if exc.claim in {"aud", "iss"}:
            _reject_audience_or_issuer(token, exc)
        _reject(f"The token has no {exc.claim} claim.", "missing_claim")
    except InvalidSubjectError:  # a `sub` that is not a string
        _reject_missing_subject()
    except pyjwt.InvalidAlgorithmError:
        _reject("The token's algorithm does not match its key.", "algorithm_mismatch")
    except pyjwt.InvalidKeyError:
        _reject("The token cannot be verified with this service's keys.", "invalid_signature")
    except pyjwt.DecodeError:
        _reject("The token is not a well-formed JWT.", "malformed_token")
    except pyjwt.InvalidTokenError:
        _reject("The token's claims are not valid.", "invalid_token")
    return claims


def _reject_audience_or_issuer(
    token: str, exc: pyjwt.InvalidTokenError | pyjwt.MissingRequiredClaimError
) -> NoReturn:
    # PyJWT checks claims only once the signature holds, so the payload can be read here. A
    # project key (anon, service_role) has neither our audience nor our issuer, and deserves
    # the answer that says what it is.
    _reject_project_key(pyjwt.decode(token, options={"verify_signature": False}).get("role"))
    missing = isinstance(exc, pyjwt.MissingRequiredClaimError)
    if isinstance(exc, pyjwt.InvalidIssuerError) or (
        isinstance(exc, pyjwt.MissingRequiredClaimError) and exc.claim == "iss"
    ):
        _reject("The token was not issued by this service's Supabase project.", "invalid_issuer")
    if missing:
        _reject("The token has no audience (aud).", "invalid_audience")
    _reject(
        f"The token is not meant for this service (aud is not {settings.SUPABASE_JWT_AUDIENCE!r}).",
        "invalid_audience",
    )


def _reject_project_key(role: Any) -> None:
    if isinstance(role, str) and role in PROJECT_KEY_ROLES:
        _reject(
            f"This is the Supabase project's {role} key, not a user's access token; log in and "
            "send the access token you get.",
            "not_a_user_token",
        )


def _reject_missing_subject() -> NoReturn:
    _reject("The token names no user (no sub).", "missing_subject")


def _check_claims(claims: dict[str, Any]) -> SupabaseClaims:
    """What PyJWT does not check: who the token is for, in values the database can store."""
    role = claims.get("role")
    _reject_project_key(role)
    if role != USER_ROLE:
        _reject(f"The token's role must be {USER_ROLE!r}.", "invalid_role")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject.strip():
        _reject_missing_subject()
    if len(subject) > MAX_SUBJECT_LENGTH:
        _reject("The token's subject (sub) is too long.", "invalid_subject")
    if _UNSTORABLE.search(subject):
        _reject("The token's subject (sub) contains control characters.", "invalid_subject")
    is_anonymous = claims.get("is_anonymous") is True
    if is_anonymous and not settings.ALLOW_ANONYMOUS_USERS:
        _reject(
            "Anonymous Supabase users may not use this service; sign in with an account.",
            "anonymous_user_not_allowed",
        )
    email = claims.get("email")
    if not isinstance(email, str) or len(email) > MAX_EMAIL_LENGTH:
        email = ""
    if _UNSTORABLE.search(email):
        _reject("The token's email contains control characters.", "invalid_email")
    return SupabaseClaims(
        subject=subject, email=email, role=role, is_anonymous=is_anonymous, claims=claims
    )


def verify_supabase_token(token: str) -> SupabaseClaims:
    """The claims of a valid Supabase user access token; AuthenticationFailed (401) otherwise,
    ServiceUnavailable (503) when the project's keys are needed and cannot be fetched."""
    if len(token) > MAX_TOKEN_LENGTH:
        _reject("The bearer credential is too long.", "credential_too_long")
    if token.startswith(SUPABASE_API_KEY_PREFIXES):
        _reject(
            "This is a Supabase project API key, not a user's access token.", "not_a_user_token"
        )
    if not _JWT_SHAPE.match(token):
        _reject(
            "The bearer credential is neither an API key nor a JWT (three base64url parts "
            "separated by dots).",
            "malformed_token",
        )
    # A client sends the same token with every request until it expires: a worker that verified
    # it moments ago (AUTH_CACHE_SECONDS) only checks that it has not expired since.
    fingerprint = hashlib.sha256(token.encode()).digest()
    claims = remembered(("verified-token", fingerprint), lambda: _verify(token))
    assert claims is not None
    expires_at = claims.expires_at
    if expires_at is not None and expires_at + settings.SUPABASE_JWT_LEEWAY_SECONDS <= time.time():
        _reject_expired()
    return claims


def _verify(token: str) -> SupabaseClaims:
    try:
        header = pyjwt.get_unverified_header(token)
    except pyjwt.PyJWTError:
        _reject("The token's header is not valid base64url-encoded JSON.", "malformed_token")
    key, alg = _verification_key(header)
    return _check_claims(_decode(token, key, alg))


def access_token_claims(
    *,
    subject: str,
    email: str,
    issuer: str,
    lifetime_seconds: int = 3600,
    is_anonymous: bool = False,
) -> dict[str, Any]:
    """The claims Supabase Auth puts in a user's access token."""
    now = int(time.time())
    return {
        "aud": "authenticated",
        "exp": now + lifetime_seconds,
        "iat": now,
        "iss": issuer,
        "sub": subject,
        "email": email,
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {"email": email, "email_verified": True, "sub": subject},
        "role": "authenticated",
        "aal": "aal1",
        "amr": [{"method": "password", "timestamp": now}],
        "session_id": str(uuid.uuid4()),
        "is_anonymous": is_anonymous,
    }


def mint_token(
    *,
    subject: str,
    email: str,
    lifetime_seconds: int = 3600,
    extra: dict[str, Any] | None = None,
    key: Any = None,
    algorithm: str = "HS256",
    kid: str | None = None,
    issuer: str | None = None,
) -> str:
    """An access token shaped exactly like Supabase's: by default HS256 with SUPABASE_JWT_SECRET
    (development tokens, tests); with `key`, `algorithm` and `kid`, signed the way a project with
    asymmetric keys signs. `extra` claims override the standard ones."""
    if issuer is None:
        issuer = (
            f"{settings.SUPABASE_URL}/auth/v1" if settings.SUPABASE_URL else "embedplatform-dev"
        )
    payload = access_token_claims(
        subject=subject, email=email, issuer=issuer, lifetime_seconds=lifetime_seconds
    )
    payload.update(extra or {})
    headers = {"kid": kid} if kid else None
    signing_key = settings.SUPABASE_JWT_SECRET if key is None else key
    return pyjwt.encode(payload, signing_key, algorithm=algorithm, headers=headers)
