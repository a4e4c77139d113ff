"""How the project's signing keys are fetched from Supabase's JWKS: rotation, caching, outages.

The keys come from a local fake Supabase (tests/jwks_server.py); the JWKS client's clock is a
manual one, so expiry is tested without waiting.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from rest_framework.exceptions import AuthenticationFailed

from accounts.jwks import clear_jwks_cache, get_jwks_cache, parse_jwks
from accounts.jwt import verify_supabase_token
from tests.helpers import ManualClock, assert_error, get_usage
from tests.jwks_server import FakeSupabase, SigningKey, generate_key
from tests.service import free_port


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
    assert get_usage(supabase.mint(old)).status_code == 200
    assert supabase.jwks_requests == 1

    new = supabase.add_key("RS256")  # Supabase rotates: a new key appears in the JWKS
    # Keys were fetched moments ago, so an unknown kid does not refetch yet...
    assert_error(get_usage(supabase.mint(new)), 401, code="unknown_signing_key")
    assert supabase.jwks_requests == 1
    clock.advance(1.1)
    # ...and does once the interval has passed.
    assert get_usage(supabase.mint(new)).status_code == 200
    assert supabase.jwks_requests == 2
    assert get_usage(supabase.mint(old)).status_code == 200
    assert supabase.jwks_requests == 2


@pytest.mark.django_db
def test_it_stops_accepting_a_withdrawn_key_once_the_cached_keys_expire(
    supabase: FakeSupabase, settings: Any
) -> None:
    settings.SUPABASE_JWKS_CACHE_SECONDS = 1
    clock = jwks_clock()
    withdrawn, kept = supabase.add_key("ES256"), supabase.add_key("ES256")
    token = supabase.mint(withdrawn)
    assert get_usage(token).status_code == 200
    supabase.unpublish(withdrawn)
    assert get_usage(token).status_code == 200  # the keys are cached, for at most a second here
    assert supabase.jwks_requests == 1
    clock.advance(1.1)
    assert_error(get_usage(token), 401, code="unknown_signing_key")
    assert supabase.jwks_requests == 2
    assert get_usage(supabase.mint(kept)).status_code == 200
    assert supabase.jwks_requests == 2


@pytest.mark.django_db
def test_it_keeps_the_projects_keys_ten_minutes_at_most_whatever_the_setting_says(
    supabase: FakeSupabase, settings: Any
) -> None:
    settings.SUPABASE_JWKS_CACHE_SECONDS = 24 * 3600
    withdrawn = supabase.add_key("ES256")
    token = supabase.mint(withdrawn)
    clock = jwks_clock()  # ten minutes pass in a moment
    assert get_usage(token).status_code == 200
    supabase.unpublish(withdrawn)

    clock.advance(599)
    assert get_usage(token).status_code == 200
    clock.advance(2)
    assert_error(get_usage(token), 401, code="unknown_signing_key")
    assert supabase.jwks_requests == 2


@pytest.mark.django_db
def test_it_does_not_let_made_up_kids_flood_supabase_with_fetches(
    supabase: FakeSupabase,
) -> None:
    published = supabase.add_key("ES256")
    assert get_usage(supabase.mint(published)).status_code == 200
    outsider = generate_key("ES256")
    for _ in range(20):
        forged = SigningKey(
            kid=str(uuid.uuid4()), algorithm="ES256", private_key=outsider.private_key
        )
        assert_error(get_usage(supabase.mint(forged)), 401, code="unknown_signing_key")
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
    response = get_usage(token)
    assert time.monotonic() - started < 1.0
    error = assert_error(response, 503, error_type="service_unavailable", code="jwks_unavailable")
    assert "127.0.0.1" not in error["message"]
    # Legacy HS256 tokens need no keys and keep working meanwhile.
    assert get_usage(supabase.mint(None)).status_code == 200


@pytest.mark.django_db
def test_it_gives_up_on_a_hung_jwks_endpoint_after_its_timeout(
    supabase: FakeSupabase, settings: Any
) -> None:
    settings.SUPABASE_JWKS_TIMEOUT_SECONDS = 0.3
    token = supabase.mint(supabase.add_key("ES256"))
    supabase.stall_jwks_seconds = 30
    started = time.monotonic()
    assert_error(get_usage(token), 503, code="jwks_unavailable")
    assert time.monotonic() - started < 1.5
    # Right after a failure, requests fail fast instead of each waiting for its own timeout.
    started = time.monotonic()
    assert_error(get_usage(token), 503, code="jwks_unavailable")
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
    assert_error(get_usage(token), 401, code="invalid_signature")


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
