"""Every kind of bad credential gets a 401 that does no work.

One table: a credential, and the error code its 401 must carry. Tokens are made the way Supabase
makes them (HS256 with the project's secret; ES256 and RS256 with keys its JWKS publishes, served
by a local fake Supabase, tests/jwks_server.py), then broken one way each. Each answer must be
the common error shape with `WWW-Authenticate: Bearer`, say why, leak no secret, and leave no
trace: no model work, no usage row, no user created.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import jwt as pyjwt
import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from accounts import services
from accounts.models import UsageLog
from tests.conftest import FakeEncoder, Person
from tests.helpers import assert_error
from tests.jwks_server import FakeSupabase, SigningKey, generate_key

pytestmark = pytest.mark.django_db

User = get_user_model()


@dataclass(frozen=True)
class Keys:
    es256: SigningKey
    rs256: SigningKey
    outsider: SigningKey  # an ES256 key the project does not publish
    outsider_rsa: SigningKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    # Generated once: RSA keys take a while, and the cases only need them to differ.
    return Keys(
        es256=generate_key("ES256"),
        rs256=generate_key("RS256"),
        outsider=generate_key("ES256"),
        outsider_rsa=generate_key("RS256"),
    )


@dataclass
class Scene:
    supabase: FakeSupabase
    keys: Keys
    alice: Person
    secret: str
    revoked_key: str
    expired_key: str
    live_key: str

    def token(self, key: SigningKey | None = None, **claims: Any) -> str:
        """A valid access token of alice's, with `claims` changed (None drops a claim)."""
        dropped = [name for name, value in claims.items() if value is None]
        token = self.supabase.mint(
            key,
            subject=self.alice.subject,
            email=self.alice.email,
            **{name: value for name, value in claims.items() if value is not None},
        )
        if not dropped:
            return token
        header, payload, _ = split(token)
        for name in dropped:
            payload.pop(name, None)
        signer = key.private_key if key else self.secret
        return pyjwt.encode(payload, signer, algorithm=header["alg"], headers=header)


@pytest.fixture
def scene(supabase: FakeSupabase, keys: Keys, alice: Person, settings: Any) -> Scene:
    supabase.publish(keys.es256)
    supabase.publish(keys.rs256)
    revoked, revoked_raw = services.create_api_key(tenant=alice.tenant, name="revoked")
    services.revoke_api_key(api_key=revoked)
    _, expired_raw = services.create_api_key(
        tenant=alice.tenant, name="expired", expires_at=timezone.now() - timedelta(minutes=1)
    )
    _, live_raw = services.create_api_key(tenant=alice.tenant, name="live")
    return Scene(
        supabase=supabase,
        keys=keys,
        alice=alice,
        secret=settings.SUPABASE_JWT_SECRET,
        revoked_key=revoked_raw,
        expired_key=expired_raw,
        live_key=live_raw,
    )


# --- Forging helpers ----------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


def split(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")
    return (
        json.loads(base64.urlsafe_b64decode(header + "==")),
        json.loads(base64.urlsafe_b64decode(payload + "==")),
        signature,
    )


def hmac_signed(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    """HS256 by hand: PyJWT itself refuses to use a PEM public key as an HMAC secret."""
    signing_input = f"{b64json(header)}.{b64json(payload)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def unsigned(scene: Scene, alg: str) -> str:
    _, payload, _ = split(scene.token())
    return f"{b64json({'alg': alg, 'typ': 'JWT'})}.{b64json(payload)}."


def with_payload_of(token: str, **changes: Any) -> str:
    """The token's header and signature around a changed payload."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    return f"{header}.{b64json({**claims, **changes})}.{signature}"


def with_flipped_signature(token: str) -> str:
    header, payload, signature = token.split(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    return f"{header}.{payload}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"


def signed_by(key: SigningKey, claims: dict[str, Any], **header: Any) -> str:
    return pyjwt.encode(claims, key.private_key, algorithm=key.algorithm, headers=header)


def hs256_with_public_pem(scene: Scene) -> str:
    """The classic confusion attack: the RSA public key (public, after all) as an HMAC secret."""
    _, payload, _ = split(scene.token(scene.keys.rs256))
    header = {"alg": "HS256", "typ": "JWT", "kid": scene.keys.rs256.kid}
    return hmac_signed(header, payload, scene.keys.rs256.public_pem())


def rs256_header_on_an_ec_kid(scene: Scene) -> str:
    _, payload, _ = split(scene.token(scene.keys.es256))
    return signed_by(scene.keys.outsider_rsa, payload, kid=scene.keys.es256.kid)


def embedded_attacker_jwk(scene: Scene) -> str:
    _, payload, _ = split(scene.token(scene.keys.es256))
    outsider = scene.keys.outsider
    return signed_by(outsider, payload, kid=outsider.kid, jwk=outsider.public_jwk())


def forged_under_a_published_kid(scene: Scene) -> str:
    _, payload, _ = split(scene.token(scene.keys.es256))
    return signed_by(scene.keys.outsider, payload, kid=scene.keys.es256.kid)


def unknown_api_key(scene: Scene) -> str:
    return f"emb_{uuid.uuid4().hex[:12]}_{b64(uuid.uuid4().bytes + uuid.uuid4().bytes)[:43]}"


def live_key_with_wrong_secret(scene: Scene) -> str:
    prefix = scene.live_key[:16]
    return f"{prefix}_{b64(uuid.uuid4().bytes + uuid.uuid4().bytes)[:43]}"


def bearer(make: Callable[[Scene], str]) -> Callable[[Scene], str]:
    return lambda scene: f"Bearer {make(scene)}"


NOW = int(time.time())
HOUR = 3600

# (Authorization header or None, expected error code), one per way a credential can be bad.
CASES = [
    pytest.param(lambda s: None, "missing_credentials", id="no-authorization-header"),
    pytest.param(lambda s: "Bearer", "malformed_credentials", id="bearer-with-nothing"),
    pytest.param(lambda s: "Bearer    ", "malformed_credentials", id="bearer-with-blanks"),
    pytest.param(
        lambda s: "Basic " + b64(b"alice@example.com:password"),
        "missing_credentials",
        id="basic-scheme",
    ),
    pytest.param(lambda s: f"Token {s.token()}", "missing_credentials", id="token-scheme"),
    pytest.param(lambda s: s.token(), "missing_credentials", id="jwt-without-scheme"),
    pytest.param(bearer(lambda s: "not-a-token"), "malformed_token", id="garbage"),
    pytest.param(bearer(lambda s: "a.b.c.d"), "malformed_token", id="four-parts"),
    pytest.param(bearer(lambda s: "..."), "malformed_token", id="three-dots"),
    pytest.param(
        bearer(lambda s: s.token().replace(".", "%", 1)), "malformed_token", id="not-base64url"
    ),
    pytest.param(bearer(lambda s: "a" + s.token()), "malformed_token", id="header-corrupted"),
    pytest.param(
        bearer(lambda s: b64(b"not json") + "." + s.token().split(".", 1)[1]),
        "malformed_token",
        id="header-not-json",
    ),
    pytest.param(
        bearer(lambda s: pyjwt.encode(split(s.token())[1], "not-the-secret", algorithm="HS256")),
        "invalid_signature",
        id="hs256-wrong-secret",
    ),
    pytest.param(
        bearer(lambda s: s.token(exp=NOW - HOUR, iat=NOW - 2 * HOUR)),
        "token_expired",
        id="expired",
    ),
    pytest.param(
        bearer(lambda s: s.token(nbf=NOW + HOUR)), "token_not_yet_valid", id="nbf-in-future"
    ),
    pytest.param(bearer(lambda s: s.token(exp=None)), "missing_claim", id="no-exp"),
    pytest.param(bearer(lambda s: s.token(aud="storage")), "invalid_audience", id="wrong-audience"),
    pytest.param(bearer(lambda s: s.token(aud=None)), "invalid_audience", id="no-audience"),
    pytest.param(
        bearer(lambda s: s.token(iss="https://another-project.supabase.co/auth/v1")),
        "invalid_issuer",
        id="wrong-issuer",
    ),
    pytest.param(bearer(lambda s: s.supabase.anon_key), "not_a_user_token", id="anon-key"),
    pytest.param(
        bearer(lambda s: s.supabase.service_role_key), "not_a_user_token", id="service-role-key"
    ),
    pytest.param(
        bearer(lambda s: "sb_secret_" + "x" * 32), "not_a_user_token", id="supabase-secret-key"
    ),
    pytest.param(
        bearer(lambda s: s.token(is_anonymous=True)),
        "anonymous_user_not_allowed",
        id="anonymous-sign-in",
    ),
    pytest.param(bearer(lambda s: s.token(sub=None)), "missing_subject", id="no-subject"),
    pytest.param(bearer(lambda s: s.token(sub="")), "missing_subject", id="empty-subject"),
    pytest.param(bearer(lambda s: s.token(role="supabase_admin")), "invalid_role", id="other-role"),
    pytest.param(bearer(lambda s: s.token(role=None)), "invalid_role", id="no-role"),
    pytest.param(
        bearer(lambda s: s.token(role=["authenticated"])), "invalid_role", id="role-as-a-list"
    ),
    pytest.param(
        bearer(lambda s: s.token(role={"name": "service_role"})),
        "invalid_role",
        id="role-as-an-object",
    ),
    pytest.param(bearer(lambda s: unsigned(s, "none")), "unsupported_algorithm", id="alg-none"),
    pytest.param(bearer(lambda s: unsigned(s, "NoNe")), "unsupported_algorithm", id="alg-NoNe"),
    pytest.param(
        bearer(lambda s: pyjwt.encode(split(s.token())[1], s.secret, algorithm="HS512")),
        "unsupported_algorithm",
        id="hs512-with-the-secret",
    ),
    pytest.param(
        bearer(hs256_with_public_pem), "invalid_signature", id="hs256-signed-with-rsa-public-key"
    ),
    pytest.param(
        bearer(lambda s: signed_by(s.keys.outsider_rsa, split(s.token())[1], kid="kid-x")),
        "unknown_signing_key",
        id="rs256-unknown-kid",
    ),
    pytest.param(
        bearer(lambda s: signed_by(s.keys.outsider, split(s.token())[1])),
        "unknown_signing_key",
        id="es256-without-kid",
    ),
    pytest.param(
        bearer(lambda s: signed_by(s.keys.outsider, split(s.token())[1], kid=s.keys.outsider.kid)),
        "unknown_signing_key",
        id="es256-key-not-in-jwks",
    ),
    pytest.param(
        bearer(forged_under_a_published_kid), "invalid_signature", id="es256-forged-under-its-kid"
    ),
    pytest.param(
        bearer(embedded_attacker_jwk), "unknown_signing_key", id="es256-embedded-attacker-jwk"
    ),
    pytest.param(
        bearer(rs256_header_on_an_ec_kid), "algorithm_mismatch", id="rs256-claiming-an-ec-key"
    ),
    pytest.param(
        bearer(lambda s: with_payload_of(s.token(s.keys.es256), sub=str(uuid.uuid4()))),
        "invalid_signature",
        id="tampered-payload-es256",
    ),
    pytest.param(
        bearer(lambda s: with_payload_of(s.token(), role="service_role")),
        "invalid_signature",
        id="tampered-payload-hs256",
    ),
    pytest.param(
        bearer(lambda s: with_flipped_signature(s.token(s.keys.rs256))),
        "invalid_signature",
        id="tampered-signature-rs256",
    ),
    pytest.param(bearer(lambda s: "a" * 9000), "credential_too_long", id="oversized"),
    pytest.param(bearer(lambda s: s.token() + "é"), "malformed_credentials", id="non-ascii-latin1"),
    pytest.param(bearer(lambda s: "🔑" + s.token()), "malformed_credentials", id="non-ascii-emoji"),
    pytest.param(
        bearer(lambda s: s.token().replace(".", ". ", 1)),
        "malformed_credentials",
        id="token-with-a-space",
    ),
    pytest.param(bearer(unknown_api_key), "invalid_api_key", id="unknown-api-key"),
    pytest.param(
        bearer(live_key_with_wrong_secret), "invalid_api_key", id="api-key-with-wrong-secret"
    ),
    pytest.param(bearer(lambda s: s.revoked_key), "revoked_api_key", id="revoked-api-key"),
    pytest.param(bearer(lambda s: s.expired_key), "expired_api_key", id="expired-api-key"),
    pytest.param(bearer(lambda s: "emb_short"), "malformed_api_key", id="malformed-api-key"),
    pytest.param(bearer(lambda s: s.live_key[:-1]), "malformed_api_key", id="truncated-api-key"),
]


@pytest.mark.parametrize(("authorization", "code"), CASES)
def test_it_refuses_a_bad_credential_with_401_and_does_no_work(
    scene: Scene,
    fake_encoder: FakeEncoder,
    authorization: Callable[[Scene], str | None],
    code: str,
) -> None:
    users_before = User.objects.count()
    header = authorization(scene)
    extra: dict[str, Any] = {} if header is None else {"HTTP_AUTHORIZATION": header}
    response = Client().post(
        "/embed", {"text": "hello world"}, content_type="application/json", **extra
    )
    error = assert_error(response, 401, error_type="authentication_error", code=code)
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert fake_encoder.texts_encoded == 0
    assert UsageLog.objects.count() == 0
    assert User.objects.count() == users_before
    body = response.content.decode()
    assert scene.secret not in body
    assert scene.live_key not in body
    assert len(error["message"]) < 200


def test_it_has_at_least_25_cases_with_distinct_reasons() -> None:
    assert len(CASES) >= 25
    codes = {case.values[1] for case in CASES}
    assert len(codes) >= 15


@pytest.mark.parametrize("path", ["/embed", "/batch-embed", "/v1/embeddings", "/usage"])
def test_it_refuses_bad_credentials_on_every_endpoint(
    scene: Scene, fake_encoder: FakeEncoder, path: str
) -> None:
    client = Client(HTTP_AUTHORIZATION=f"Bearer {with_flipped_signature(scene.token())}")
    if path == "/usage":
        response = client.get(path)
    else:
        body = {"/embed": {"text": "a"}, "/batch-embed": {"texts": ["a"]}}.get(path, {"input": "a"})
        response = client.post(path, body, content_type="application/json")
    assert_error(response, 401, error_type="authentication_error", code="invalid_signature")
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert fake_encoder.texts_encoded == 0
    assert UsageLog.objects.count() == 0
