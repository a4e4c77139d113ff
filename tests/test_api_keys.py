"""Tenant API keys: made by `manage.py create_api_key`, shown once, stored only as a hash, revoked
by `manage.py revoke_api_key`, and acting only for their own tenant."""

from __future__ import annotations

import hashlib
import io
from datetime import timedelta
from typing import Any

import pytest
from django.apps import apps
from django.contrib.auth import get_user_model
from django.core import serializers
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from accounts import services
from accounts.models import ApiKey, Tenant, UsageLog
from tests.conftest import FakeEncoder, Person
from tests.helpers import assert_error, embed

pytestmark = pytest.mark.django_db


def create_key(**options: Any) -> tuple[str, str]:
    """Runs the command; returns (stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    call_command("create_api_key", stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


def test_it_prints_a_new_key_once_and_the_key_works(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    out, err = create_key(tenant=str(alice.tenant.pk), name="ci")
    key = out.strip()
    assert key.startswith("emb_")
    assert out == key + "\n"  # alone on stdout, so `> key.txt` keeps just the key
    api_key = ApiKey.objects.get()
    assert api_key.name == "ci"
    assert api_key.tenant == alice.tenant
    assert api_key.expires_at is None
    assert api_key.prefix in err
    assert "not shown again" in err
    assert key not in err

    response = embed(key)

    assert response.status_code == 200, response.content
    (row,) = UsageLog.objects.all()
    assert (row.api_key, row.user, row.tenant, row.tokens) == (api_key, None, alice.tenant, 4)
    assert fake_encoder.texts_encoded == 1


def test_it_finds_the_tenant_by_exact_name(alice: Person) -> None:
    out, _ = create_key(tenant="Alice's team", name="by name")
    assert ApiKey.objects.get(name="by name").tenant == alice.tenant
    assert out.strip().startswith("emb_")


def test_it_refuses_an_unknown_or_ambiguous_tenant(alice: Person) -> None:
    with pytest.raises(CommandError, match="No tenant"):
        create_key(tenant="Nobody's team", name="x")
    twin = services.create_tenant(name="Alice's team")
    with pytest.raises(CommandError, match=rf"ids {alice.tenant.pk}, {twin.pk}"):
        create_key(tenant="Alice's team", name="x")
    with pytest.raises(CommandError, match="positive"):
        create_key(tenant=str(alice.tenant.pk), name="x", expires_in_days=0)
    assert not ApiKey.objects.exists()


def test_it_gives_a_key_an_expiry_in_days(alice: Person) -> None:
    create_key(tenant=str(alice.tenant.pk), name="temp", expires_in_days=30)
    expires_at = ApiKey.objects.get().expires_at
    assert expires_at is not None
    assert abs(expires_at - (timezone.now() + timedelta(days=30))) < timedelta(minutes=1)


def test_it_stores_only_a_hash_of_the_key(
    alice: Person, fake_encoder: FakeEncoder, charlie: Person
) -> None:
    out, _ = create_key(tenant=str(alice.tenant.pk), name="ci")
    key = out.strip()
    assert embed(key).status_code == 200
    api_key = ApiKey.objects.get()
    assert api_key.hashed_key == hashlib.sha256(key.encode()).hexdigest()
    assert key.startswith(api_key.prefix + "_")
    # The secret is URL-safe base64, which may itself hold "_": cut at the prefix, not at "_".
    secret = key.removeprefix(api_key.prefix + "_")
    assert len(secret) >= 32
    # Every row of every table this project writes: the secret part is nowhere.
    dump = "".join(
        serializers.serialize("json", model._default_manager.all())
        for model in [*apps.get_app_config("accounts").get_models(), get_user_model()]
    )
    assert api_key.prefix in dump
    assert secret not in dump
    assert key not in dump


def test_it_records_when_a_key_was_last_used(alice: Person, fake_encoder: FakeEncoder) -> None:
    api_key, key = services.create_api_key(tenant=alice.tenant, name="ci")
    assert api_key.last_used_at is None
    before = timezone.now()
    assert embed(key).status_code == 200
    api_key.refresh_from_db()
    assert api_key.last_used_at is not None
    assert before <= api_key.last_used_at <= timezone.now()


def test_it_revokes_a_key_with_the_command(alice: Person, fake_encoder: FakeEncoder) -> None:
    api_key, key = services.create_api_key(tenant=alice.tenant, name="leaked")
    assert embed(key).status_code == 200
    out = io.StringIO()

    call_command("revoke_api_key", api_key.prefix, stdout=out)

    assert f"{api_key.prefix} ('leaked', tenant {alice.tenant.pk}" in out.getvalue()
    assert "revoked." in out.getvalue()
    response = embed(key)
    assert_error(response, 401, error_type="authentication_error", code="revoked_api_key")
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert fake_encoder.texts_encoded == 1
    # Given the whole key, it finds the same one, and says it was revoked already.
    out = io.StringIO()
    call_command("revoke_api_key", key, stdout=out)
    assert "was already revoked" in out.getvalue()
    with pytest.raises(CommandError, match="No API key"):
        call_command("revoke_api_key", "emb_000000000000", stdout=io.StringIO())


def test_it_cuts_a_keys_prefix_the_same_way_for_requests_and_the_revoke_command(
    alice: Person, fake_encoder: FakeEncoder, settings: Any
) -> None:
    settings.API_KEY_PREFIX = "acme"
    api_key, key = services.create_api_key(tenant=alice.tenant, name="ci")
    assert api_key.prefix.startswith("acme_")
    assert services.api_key_prefix(key) == services.api_key_prefix(api_key.prefix) == api_key.prefix
    assert embed(key).status_code == 200

    call_command("revoke_api_key", f" {key} ", stdout=io.StringIO())

    assert_error(embed(key), 401, code="revoked_api_key")


def test_it_reads_x_tenant_for_a_key_as_it_does_for_a_user(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    _, key = services.create_api_key(tenant=alice.tenant, name="ci")
    padded = f"00{alice.tenant.pk}"
    as_user = Client().get("/usage", HTTP_X_TENANT=padded, **alice.client_headers)
    assert as_user.json()["tenant"]["id"] == alice.tenant.pk
    assert embed(key, HTTP_X_TENANT=padded).status_code == 200
    assert_error(embed(key, HTTP_X_TENANT="not-a-number"), 403, code="tenant_mismatch")


def test_it_refuses_a_key_once_it_expires(alice: Person, fake_encoder: FakeEncoder) -> None:
    api_key, key = services.create_api_key(
        tenant=alice.tenant, name="soon", expires_at=timezone.now() + timedelta(hours=1)
    )
    assert embed(key).status_code == 200
    ApiKey.objects.filter(pk=api_key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert_error(embed(key), 401, error_type="authentication_error", code="expired_api_key")
    assert fake_encoder.texts_encoded == 1


def test_it_lets_a_key_act_only_for_its_own_tenant(
    alice: Person, charlie: Person, fake_encoder: FakeEncoder
) -> None:
    _, key = services.create_api_key(tenant=alice.tenant, name="ci")
    assert embed(key, HTTP_X_TENANT=str(alice.tenant.pk)).status_code == 200
    response = embed(key, HTTP_X_TENANT=str(charlie.tenant.pk))
    assert_error(response, 403, error_type="permission_error", code="tenant_mismatch")
    assert fake_encoder.texts_encoded == 1
    refused = UsageLog.objects.get(status_code=403)
    assert (refused.tenant, refused.tokens, refused.error_type) == (
        alice.tenant,
        0,
        "permission_error",
    )


def test_it_refuses_the_keys_of_an_inactive_tenant(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    _, key = services.create_api_key(tenant=alice.tenant, name="ci")
    Tenant.objects.filter(pk=alice.tenant.pk).update(is_active=False)
    response = embed(key)
    assert_error(response, 403, error_type="permission_error", code="tenant_inactive")
    assert fake_encoder.texts_encoded == 0
    (row,) = UsageLog.objects.all()
    assert (row.tenant, row.tokens, row.status_code) == (alice.tenant, 0, 403)


def test_it_shows_a_key_its_own_tenants_usage(alice: Person, charlie: Person) -> None:
    _, key = services.create_api_key(tenant=charlie.tenant, name="ci")
    response = Client().get("/usage", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert response.status_code == 200
    assert response.json()["tenant"]["id"] == charlie.tenant.pk


@pytest.mark.parametrize("junk", ["\x00", "\x07", "\x1b", "\x7f"])
def test_it_refuses_a_key_with_control_characters_before_any_query(
    alice: Person, fake_encoder: FakeEncoder, junk: str, django_assert_num_queries: Any
) -> None:
    _, key = services.create_api_key(tenant=alice.tenant, name="ci")
    for mangled in (key[:8] + junk + key[9:], key[:-1] + junk, key + junk):
        with django_assert_num_queries(0):
            response = embed(mangled)
        assert_error(response, 401, error_type="authentication_error")
    assert fake_encoder.texts_encoded == 0
    assert not UsageLog.objects.exists()
