"""Supabase access tokens that must work, and how the project's signing keys are fetched.

Tokens come from a local fake Supabase (tests/jwks_server.py) that signs them as Supabase does
and publishes its keys at /auth/v1/.well-known/jwks.json; the bad ones are in
test_auth_matrix.py.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request
from rest_framework.test import APIRequestFactory

from accounts import services
from accounts.authentication import SupabaseJWTAuthentication
from accounts.jwks import clear_jwks_cache, get_jwks_cache, parse_jwks
from accounts.jwt import mint_token, verify_supabase_token
from accounts.models import Membership, SupabaseIdentity, Tenant, UsageLog
from accounts.permissions import resolve_tenant
from tests.conftest import FakeEncoder, Person
from tests.helpers import assert_error, embed
from tests.jwks_server import FakeSupabase, SigningKey, generate_key
from tests.service import free_port

User = get_user_model()


def usage(token: str, **headers: Any) -> Any:
    return Client().get("/usage", HTTP_AUTHORIZATION=f"Bearer {token}", **headers)


# --- Accepted tokens and just-in-time users ----------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("algorithm", ["HS256", "ES256", "RS256"])
def test_it_accepts_a_supabase_token_and_creates_its_user_and_personal_tenant(
    supabase: FakeSupabase, fake_encoder: FakeEncoder, algorithm: str
) -> None:
    key = None if algorithm == "HS256" else supabase.add_key(algorithm)
    subject = str(uuid.uuid4())
    token = supabase.mint(key, subject=subject, email="dora@example.com")
    assert token.count(".") == 2

    response = embed(token)

    assert response.status_code == 200, response.content
    identity = SupabaseIdentity.objects.select_related("user").get(subject=subject)
    assert identity.email == identity.user.email == "dora@example.com"
    assert not identity.user.has_usable_password()
    tenant = Tenant.objects.get(personal_owner=identity.user)
    membership = Membership.objects.get(user=identity.user)
    assert membership.tenant == tenant
    assert membership.is_default
    assert membership.role == Membership.Role.OWNER
    (row,) = UsageLog.objects.all()
    assert (row.user, row.tenant, row.status_code) == (identity.user, tenant, 200)
    assert fake_encoder.texts_encoded == 1


@pytest.mark.django_db
def test_it_accepts_legacy_and_asymmetric_tokens_of_one_user_side_by_side(
    supabase: FakeSupabase,
) -> None:
    es256, rs256 = supabase.add_key("ES256"), supabase.add_key("RS256")
    subject = str(uuid.uuid4())
    for key in (None, es256, rs256):
        response = usage(supabase.mint(key, subject=subject))
        assert response.status_code == 200, (key, response.content)
    assert SupabaseIdentity.objects.filter(subject=subject).count() == 1
    assert Tenant.objects.filter(personal_owner__supabase_identity__subject=subject).count() == 1


@pytest.mark.django_db
def test_it_accepts_hs256_tokens_that_name_their_key(supabase: FakeSupabase) -> None:
    """Newer projects put a `kid` on HS256 tokens too; the secret verifies them, no JWKS asked."""
    token = mint_token(
        subject=str(uuid.uuid4()), email="kid@example.com", kid="legacy", issuer=supabase.issuer
    )
    assert pyjwt.get_unverified_header(token)["kid"] == "legacy"
    assert usage(token).status_code == 200
    assert supabase.jwks_requests == 0


@pytest.mark.django_db
def test_it_keeps_the_email_in_step_with_the_token(supabase: FakeSupabase) -> None:
    subject = str(uuid.uuid4())
    assert usage(supabase.mint(None, subject=subject, email="old@example.com")).status_code == 200
    assert usage(supabase.mint(None, subject=subject, email="new@example.com")).status_code == 200
    identity = SupabaseIdentity.objects.select_related("user").get(subject=subject)
    assert identity.email == identity.user.email == "new@example.com"
    assert User.objects.filter(supabase_identity__subject=subject).count() == 1


def authenticate_and_resolve(token: str, **headers: Any) -> services.Caller:
    """What the identity layer does for every request: the credential, then the tenant."""
    request = Request(
        APIRequestFactory().get("/usage", HTTP_AUTHORIZATION=f"Bearer {token}", **headers),
        authenticators=[SupabaseJWTAuthentication()],
    )
    assert request.user.is_authenticated
    return resolve_tenant(request)


@pytest.mark.django_db
def test_it_identifies_a_known_user_and_their_tenant_with_one_query(
    alice: Person, bob: Person, django_assert_num_queries: Any
) -> None:
    side_project = services.create_tenant(name="Bob's side project", owner=bob.user)
    authenticate_and_resolve(bob.token)  # notes the sign-in time, once a minute at most
    with django_assert_num_queries(1):
        caller = authenticate_and_resolve(bob.token)
    assert (caller.user, caller.tenant) == (bob.user, alice.tenant)
    with django_assert_num_queries(1):
        caller = authenticate_and_resolve(bob.token, HTTP_X_TENANT=str(side_project.pk))
    assert caller.tenant == side_project


@pytest.mark.django_db
def test_it_refuses_a_disabled_user(alice: Person) -> None:
    User.objects.filter(pk=alice.user.pk).update(is_active=False)
    response = usage(alice.token)
    assert_error(response, 401, error_type="authentication_error", code="user_inactive")


@pytest.mark.django_db
def test_it_accepts_an_audience_list_that_includes_authenticated(supabase: FakeSupabase) -> None:
    token = supabase.mint(None, aud=["authenticated", "storage"])
    assert usage(token).status_code == 200


@pytest.mark.django_db
def test_it_allows_a_little_clock_skew_and_no_more(supabase: FakeSupabase, settings: Any) -> None:
    now = int(time.time())
    just_expired = supabase.mint(None, exp=now - 10, iat=now - 3610)
    settings.SUPABASE_JWT_LEEWAY_SECONDS = 30
    assert usage(just_expired).status_code == 200
    settings.SUPABASE_JWT_LEEWAY_SECONDS = 0
    assert_error(usage(just_expired), 401, code="token_expired")


@pytest.mark.django_db
def test_it_admits_anonymous_sign_ins_only_when_allowed(
    supabase: FakeSupabase, settings: Any
) -> None:
    token = supabase.mint(None, is_anonymous=True, email="")
    assert_error(usage(token), 401, code="anonymous_user_not_allowed")
    settings.ALLOW_ANONYMOUS_USERS = True
    assert usage(token).status_code == 200


@pytest.mark.django_db
def test_it_checks_the_issuer_only_when_a_supabase_url_is_configured(settings: Any) -> None:
    settings.SUPABASE_URL = ""
    settings.SUPABASE_JWKS_URL = ""
    with FakeSupabase(jwt_secret=settings.SUPABASE_JWT_SECRET) as elsewhere:
        token = elsewhere.mint(None)
        assert usage(token).status_code == 200
        settings.SUPABASE_URL = "https://myproject.supabase.co"
        assert_error(usage(token), 401, code="invalid_issuer")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("claims", "code"),
    [
        pytest.param({"aud": [123]}, "invalid_audience", id="audience-not-a-string"),
        pytest.param({"aud": ["storage", "realtime"]}, "invalid_audience", id="other-audiences"),
        pytest.param({"iss": None}, "invalid_issuer", id="no-issuer"),
        pytest.param({"iss": 7}, "invalid_issuer", id="issuer-not-a-string"),
        pytest.param({"role": "anon"}, "not_a_user_token", id="anon-role-with-our-audience"),
        pytest.param(
            {"role": "service_role", "aud": None}, "not_a_user_token", id="service-role-no-aud"
        ),
        pytest.param({"sub": 42}, "missing_subject", id="subject-not-a-string"),
    ],
)
def test_it_names_what_is_wrong_with_audience_issuer_role_and_subject(
    supabase: FakeSupabase, claims: dict[str, Any], code: str
) -> None:
    payload = pyjwt.decode(supabase.mint(None), options={"verify_signature": False})
    payload.update(claims)
    payload = {name: value for name, value in payload.items() if value is not None}
    # Signed as bytes: PyJWT's own encoder refuses some of these payloads.
    token = pyjwt.PyJWS().encode(json.dumps(payload).encode(), supabase.jwt_secret, "HS256")
    assert_error(usage(token), 401, error_type="authentication_error", code=code)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("claims", "code"),
    [
        pytest.param({"sub": "user\x00id"}, "invalid_subject", id="nul-in-subject"),
        pytest.param({"sub": "\x1b[31mred"}, "invalid_subject", id="escape-in-subject"),
        pytest.param({"sub": "half-\ud800-pair"}, "invalid_subject", id="surrogate-in-subject"),
        pytest.param({"email": "eve\x00@example.com"}, "invalid_email", id="nul-in-email"),
        pytest.param({"email": "eve@example.com\r\nBcc: x"}, "invalid_email", id="crlf-in-email"),
        pytest.param({"email": "\ud83d@example.com"}, "invalid_email", id="surrogate-in-email"),
    ],
)
@pytest.mark.parametrize("algorithm", ["HS256", "ES256"])
def test_it_refuses_claims_the_database_cannot_store_with_401(
    supabase: FakeSupabase,
    fake_encoder: FakeEncoder,
    claims: dict[str, Any],
    code: str,
    algorithm: str,
) -> None:
    """A validly signed token is still refused, before anything reaches PostgreSQL, when a claim
    that becomes a row holds a NUL, a control character or half a surrogate pair."""
    assert connection.vendor == "postgresql"
    key = None if algorithm == "HS256" else supabase.add_key(algorithm)
    token = supabase.mint(key, **claims)
    users_before = User.objects.count()

    for response in (usage(token), embed(token)):
        error = assert_error(response, 401, error_type="authentication_error", code=code)
        assert "control characters" in error["message"]
        assert response["WWW-Authenticate"].startswith("Bearer")
    assert User.objects.count() == users_before
    assert not SupabaseIdentity.objects.exists()
    assert not UsageLog.objects.exists()
    assert fake_encoder.texts_encoded == 0


@pytest.mark.django_db
def test_it_accepts_a_subject_and_email_in_any_script(supabase: FakeSupabase) -> None:
    subject = f"{uuid.uuid4()}-ünïcødé-日本"
    token = supabase.mint(None, subject=subject, email="zoë@bücher.example")
    assert usage(token).status_code == 200
    identity = SupabaseIdentity.objects.get(subject=subject)
    assert identity.email == "zoë@bücher.example"


@pytest.mark.django_db
def test_it_refuses_hs256_when_the_project_has_only_asymmetric_keys(
    supabase: FakeSupabase, settings: Any
) -> None:
    key = supabase.add_key("ES256")
    hs256 = supabase.mint(None)
    settings.SUPABASE_JWT_SECRET = ""
    assert_error(usage(hs256), 401, code="unsupported_algorithm")
    assert usage(supabase.mint(key)).status_code == 200


@pytest.mark.django_db
def test_it_refuses_asymmetric_tokens_when_no_project_keys_are_configured(
    supabase: FakeSupabase, settings: Any
) -> None:
    token = supabase.mint(supabase.add_key("ES256"))
    settings.SUPABASE_JWKS_URL = ""
    assert_error(usage(token), 401, code="unsupported_algorithm")
    assert supabase.jwks_requests == 0


# --- The project's keys: rotation, caching, outages ---------------------------------------------


class ManualClock:
    """A clock that stands still until the test moves it."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def jwks_clock() -> ManualClock:
    """Hands the process's JWKS client (for the settings as they are now) a manual clock."""
    client = get_jwks_cache()
    assert client is not None
    clock = ManualClock()
    client.clock = clock
    return clock


@pytest.mark.django_db
def test_it_picks_up_a_new_signing_key_without_a_restart(
    supabase: FakeSupabase, settings: Any
) -> None:
    settings.SUPABASE_JWKS_REFETCH_SECONDS = 1
    clock = jwks_clock()
    old = supabase.add_key("ES256")
    assert usage(supabase.mint(old)).status_code == 200
    assert supabase.jwks_requests == 1

    new = supabase.add_key("RS256")  # Supabase rotates: a new key appears in the JWKS
    # Keys were fetched moments ago, so an unknown kid does not refetch yet...
    assert_error(usage(supabase.mint(new)), 401, code="unknown_signing_key")
    assert supabase.jwks_requests == 1
    clock.advance(1.1)
    # ...and does once the interval has passed.
    assert usage(supabase.mint(new)).status_code == 200
    assert supabase.jwks_requests == 2
    assert usage(supabase.mint(old)).status_code == 200
    assert supabase.jwks_requests == 2


@pytest.mark.django_db
def test_it_stops_accepting_a_withdrawn_key_once_the_cached_keys_expire(
    supabase: FakeSupabase, settings: Any
) -> None:
    settings.SUPABASE_JWKS_CACHE_SECONDS = 1
    clock = jwks_clock()
    withdrawn, kept = supabase.add_key("ES256"), supabase.add_key("ES256")
    token = supabase.mint(withdrawn)
    assert usage(token).status_code == 200
    supabase.unpublish(withdrawn)
    assert usage(token).status_code == 200  # the keys are cached, for at most a second here
    assert supabase.jwks_requests == 1
    clock.advance(1.1)
    assert_error(usage(token), 401, code="unknown_signing_key")
    assert supabase.jwks_requests == 2
    assert usage(supabase.mint(kept)).status_code == 200
    assert supabase.jwks_requests == 2


@pytest.mark.django_db
def test_it_keeps_the_projects_keys_ten_minutes_at_most_whatever_the_setting_says(
    supabase: FakeSupabase, settings: Any
) -> None:
    settings.SUPABASE_JWKS_CACHE_SECONDS = 24 * 3600
    withdrawn = supabase.add_key("ES256")
    token = supabase.mint(withdrawn)
    clock = jwks_clock()  # ten minutes pass in a moment
    assert usage(token).status_code == 200
    supabase.unpublish(withdrawn)

    clock.advance(599)
    assert usage(token).status_code == 200
    clock.advance(2)
    assert_error(usage(token), 401, code="unknown_signing_key")
    assert supabase.jwks_requests == 2


@pytest.mark.django_db
def test_it_does_not_let_made_up_kids_flood_supabase_with_fetches(
    supabase: FakeSupabase,
) -> None:
    published = supabase.add_key("ES256")
    assert usage(supabase.mint(published)).status_code == 200
    outsider = generate_key("ES256")
    for _ in range(20):
        forged = SigningKey(
            kid=str(uuid.uuid4()), algorithm="ES256", private_key=outsider.private_key
        )
        assert_error(usage(supabase.mint(forged)), 401, code="unknown_signing_key")
    assert supabase.jwks_requests == 1


def test_it_fetches_the_keys_once_for_many_concurrent_first_tokens(
    supabase: FakeSupabase,
) -> None:
    key = supabase.add_key("ES256")
    tokens = [supabase.mint(key) for _ in range(16)]
    supabase.stall_jwks_seconds = 0.2  # so that every thread arrives while the fetch runs
    start = threading.Barrier(len(tokens))
    subjects: list[str] = []

    def verify(token: str) -> None:
        start.wait()
        subjects.append(verify_supabase_token(token).subject)

    threads = [threading.Thread(target=verify, args=(token,)) for token in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(subjects) == 16
    assert supabase.jwks_requests == 1


def test_it_serves_known_keys_while_a_refetch_for_an_unknown_kid_hangs(
    supabase: FakeSupabase, settings: Any
) -> None:
    settings.SUPABASE_JWKS_REFETCH_SECONDS = 0
    known = supabase.add_key("ES256")
    verify_supabase_token(supabase.mint(known))
    supabase.stall_jwks_seconds = 1.5  # under the 2 s fetch timeout
    unknown = SigningKey(
        kid=str(uuid.uuid4()), algorithm="ES256", private_key=generate_key("ES256").private_key
    )
    refused: list[str] = []

    def verify_unknown() -> None:
        try:
            verify_supabase_token(supabase.mint(unknown))
        except AuthenticationFailed as exc:
            refused.append(str(exc.get_codes()))

    refetching = threading.Thread(target=verify_unknown)
    refetching.start()
    deadline = time.monotonic() + 5
    while supabase.jwks_requests < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # until the refetch is under way, holding the client's lock
    assert supabase.jwks_requests == 2

    started = time.monotonic()
    assert verify_supabase_token(supabase.mint(known)).subject
    assert time.monotonic() - started < 0.5
    refetching.join(timeout=10)
    assert refused == ["unknown_signing_key"]
    assert supabase.jwks_requests == 2


@pytest.mark.django_db
def test_it_answers_503_at_once_when_the_keys_cannot_be_fetched(
    supabase: FakeSupabase, settings: Any
) -> None:
    token = supabase.mint(supabase.add_key("ES256"))
    settings.SUPABASE_JWKS_URL = f"http://127.0.0.1:{free_port()}/auth/v1/.well-known/jwks.json"
    started = time.monotonic()
    response = usage(token)
    assert time.monotonic() - started < 1.0
    error = assert_error(response, 503, error_type="service_unavailable", code="jwks_unavailable")
    assert "127.0.0.1" not in error["message"]
    # Legacy HS256 tokens need no keys and keep working meanwhile.
    assert usage(supabase.mint(None)).status_code == 200


@pytest.mark.django_db
def test_it_gives_up_on_a_hung_jwks_endpoint_after_its_timeout(
    supabase: FakeSupabase, settings: Any
) -> None:
    settings.SUPABASE_JWKS_TIMEOUT_SECONDS = 0.3
    token = supabase.mint(supabase.add_key("ES256"))
    supabase.stall_jwks_seconds = 30
    started = time.monotonic()
    assert_error(usage(token), 503, code="jwks_unavailable")
    assert time.monotonic() - started < 1.5
    # Right after a failure, requests fail fast instead of each waiting for its own timeout.
    started = time.monotonic()
    assert_error(usage(token), 503, code="jwks_unavailable")
    assert time.monotonic() - started < 0.2
    assert supabase.jwks_requests == 1


@pytest.mark.django_db
def test_it_trusts_only_asymmetric_signing_keys_from_the_jwks(supabase: FakeSupabase) -> None:
    shared = b"a-symmetric-key-that-anyone-can-read-in-the-jwks"
    supabase.raw_jwks_entries.append(
        {"kty": "oct", "kid": "oct-key", "k": base64.urlsafe_b64encode(shared).decode()}
    )
    forged = supabase.mint(None)  # HS256, then re-signed below with the published oct key
    claims = pyjwt.decode(forged, options={"verify_signature": False})
    token = pyjwt.encode(claims, shared, algorithm="HS256", headers={"kid": "oct-key"})
    assert_error(usage(token), 401, code="invalid_signature")


def test_it_skips_keys_a_jwks_must_not_be_trusted_with() -> None:
    good = generate_key("ES256").public_jwk()
    weak_rsa = SigningKey(
        kid="weak",
        algorithm="RS256",
        private_key=rsa.generate_private_key(public_exponent=65537, key_size=1024),
    ).public_jwk()
    p384 = SigningKey(
        kid="p384", algorithm="ES256", private_key=ec.generate_private_key(ec.SECP384R1())
    )
    p384_jwk = {**p384.public_jwk(), "alg": "ES384"}
    unnamed = generate_key("ES256").public_jwk()
    document = {
        "keys": [
            good,
            {"kty": "oct", "kid": "oct", "k": "c2VjcmV0"},
            {**generate_key("ES256").public_jwk(), "kid": "enc", "use": "enc"},
            {**generate_key("ES256").public_jwk(), "kid": "sign-only", "key_ops": ["sign"]},
            {name: value for name, value in unnamed.items() if name != "kid"},
            weak_rsa,
            p384_jwk,
            "not a key",
        ]
    }
    assert set(parse_jwks(document)) == {good["kid"]}
    assert parse_jwks({"keys": []}) == {}
    with pytest.raises(ValueError, match="keys"):
        parse_jwks({"no": "keys"})


def test_it_forgets_cached_keys_when_the_settings_change(
    supabase: FakeSupabase, settings: Any
) -> None:
    key = supabase.add_key("ES256")
    verify_supabase_token(supabase.mint(key))
    settings.SUPABASE_JWKS_CACHE_SECONDS = 300
    verify_supabase_token(supabase.mint(key))
    assert supabase.jwks_requests == 2
    clear_jwks_cache()
    verify_supabase_token(supabase.mint(key))
    assert supabase.jwks_requests == 3
