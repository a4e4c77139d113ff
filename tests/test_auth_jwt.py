"""Supabase access tokens that must work.

Tokens come from a local fake Supabase (tests/jwks_server.py) that signs them as Supabase does
and publishes its keys at /auth/v1/.well-known/jwks.json; the bad ones are in
test_auth_matrix.py, how the keys are fetched in test_jwks.py.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import jwt as pyjwt
import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from rest_framework.request import Request
from rest_framework.test import APIRequestFactory

from accounts import services
from accounts.authentication import SupabaseJWTAuthentication
from accounts.jwt import mint_token
from accounts.models import Membership, SupabaseIdentity, Tenant, UsageLog
from accounts.permissions import resolve_tenant
from tests.conftest import FakeEncoder, Person
from tests.helpers import assert_error, embed, get_usage
from tests.jwks_server import FakeSupabase

User = get_user_model()


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
        response = get_usage(supabase.mint(key, subject=subject))
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
    assert get_usage(token).status_code == 200
    assert supabase.jwks_requests == 0


@pytest.mark.django_db
def test_it_keeps_the_email_in_step_with_the_token(supabase: FakeSupabase) -> None:
    subject = str(uuid.uuid4())
    assert (
        get_usage(supabase.mint(None, subject=subject, email="old@example.com")).status_code == 200
    )
    assert (
        get_usage(supabase.mint(None, subject=subject, email="new@example.com")).status_code == 200
    )
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
    response = get_usage(alice.token)
    assert_error(response, 401, error_type="authentication_error", code="user_inactive")


@pytest.mark.django_db
def test_it_accepts_an_audience_list_that_includes_authenticated(supabase: FakeSupabase) -> None:
    token = supabase.mint(None, aud=["authenticated", "storage"])
    assert get_usage(token).status_code == 200


@pytest.mark.django_db
def test_it_allows_a_little_clock_skew_and_no_more(supabase: FakeSupabase, settings: Any) -> None:
    now = int(time.time())
    just_expired = supabase.mint(None, exp=now - 10, iat=now - 3610)
    settings.SUPABASE_JWT_LEEWAY_SECONDS = 30
    assert get_usage(just_expired).status_code == 200
    settings.SUPABASE_JWT_LEEWAY_SECONDS = 0
    assert_error(get_usage(just_expired), 401, code="token_expired")


@pytest.mark.django_db
def test_it_admits_anonymous_sign_ins_only_when_allowed(
    supabase: FakeSupabase, settings: Any
) -> None:
    token = supabase.mint(None, is_anonymous=True, email="")
    assert_error(get_usage(token), 401, code="anonymous_user_not_allowed")
    settings.ALLOW_ANONYMOUS_USERS = True
    assert get_usage(token).status_code == 200


@pytest.mark.django_db
def test_it_checks_the_issuer_only_when_a_supabase_url_is_configured(settings: Any) -> None:
    settings.SUPABASE_URL = ""
    settings.SUPABASE_JWKS_URL = ""
    with FakeSupabase(jwt_secret=settings.SUPABASE_JWT_SECRET) as elsewhere:
        token = elsewhere.mint(None)
        assert get_usage(token).status_code == 200
        settings.SUPABASE_URL = "https://myproject.supabase.co"
        assert_error(get_usage(token), 401, code="invalid_issuer")


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
    assert_error(get_usage(token), 401, error_type="authentication_error", code=code)


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

    for response in (get_usage(token), embed(token)):
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
    assert get_usage(token).status_code == 200
    identity = SupabaseIdentity.objects.get(subject=subject)
    assert identity.email == "zoë@bücher.example"


@pytest.mark.django_db
def test_it_refuses_hs256_when_the_project_has_only_asymmetric_keys(
    supabase: FakeSupabase, settings: Any
) -> None:
    key = supabase.add_key("ES256")
    hs256 = supabase.mint(None)
    settings.SUPABASE_JWT_SECRET = ""
    assert_error(get_usage(hs256), 401, code="unsupported_algorithm")
    assert get_usage(supabase.mint(key)).status_code == 200


@pytest.mark.django_db
def test_it_refuses_asymmetric_tokens_when_no_project_keys_are_configured(
    supabase: FakeSupabase, settings: Any
) -> None:
    token = supabase.mint(supabase.add_key("ES256"))
    settings.SUPABASE_JWKS_URL = ""
    assert_error(get_usage(token), 401, code="unsupported_algorithm")
    assert supabase.jwks_requests == 0
