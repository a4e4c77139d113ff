"""Workers remember who a credential is for AUTH_CACHE_SECONDS, and forget at once what is saved."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from accounts import services
from accounts.models import Tenant
from tests.conftest import FakeEncoder, Person

pytestmark = pytest.mark.django_db


@pytest.fixture
def remembering(settings: Any) -> None:
    settings.AUTH_CACHE_SECONDS = 60


def embed(headers: dict[str, str]) -> Any:
    return Client().post("/embed", {"text": "a"}, content_type="application/json", headers=headers)


def queries_of(headers: dict[str, str]) -> tuple[int, list[str]]:
    with CaptureQueriesContext(connection) as captured:
        response = embed(headers)
    assert response.status_code == 200, response.content
    return len(captured.captured_queries), [q["sql"] for q in captured.captured_queries]


def test_it_resolves_a_known_user_without_asking_the_database_again(
    alice: Person, fake_encoder: FakeEncoder, remembering: None
) -> None:
    first, _ = queries_of(alice.headers)
    again, sql = queries_of(alice.headers)
    assert again < first
    assert not any("accounts_membership" in statement for statement in sql)


def test_it_resolves_a_known_api_key_without_asking_the_database_again(
    alice: Person, fake_encoder: FakeEncoder, remembering: None
) -> None:
    _, raw = services.create_api_key(tenant=alice.tenant, name="server")
    headers = {"Authorization": f"Bearer {raw}"}
    queries_of(headers)
    _, sql = queries_of(headers)
    assert not any("accounts_apikey" in statement for statement in sql)


def test_it_refuses_a_revoked_key_at_once_in_the_worker_that_revoked_it(
    alice: Person, fake_encoder: FakeEncoder, remembering: None
) -> None:
    api_key, raw = services.create_api_key(tenant=alice.tenant, name="server")
    headers = {"Authorization": f"Bearer {raw}"}
    assert embed(headers).status_code == 200
    services.revoke_api_key(api_key=api_key)
    assert embed(headers).json()["error"]["code"] == "revoked_api_key"


def test_it_refuses_a_deactivated_tenant_at_once_in_the_worker_that_saved_it(
    alice: Person, fake_encoder: FakeEncoder, remembering: None
) -> None:
    assert embed(alice.headers).status_code == 200
    tenant = Tenant.objects.get(pk=alice.tenant.pk)
    tenant.is_active = False
    tenant.save()
    assert embed(alice.headers).status_code == 403


def test_it_sees_changes_made_elsewhere_once_its_memory_expires(
    alice: Person, fake_encoder: FakeEncoder, settings: Any
) -> None:
    settings.AUTH_CACHE_SECONDS = 0.3
    assert embed(alice.headers).status_code == 200
    # An update that fires no signal stands for another worker's change.
    Tenant.objects.filter(pk=alice.tenant.pk).update(is_active=False)
    assert embed(alice.headers).status_code == 200
    time.sleep(0.35)
    assert embed(alice.headers).status_code == 403


def test_it_skips_the_quota_query_for_a_tenant_far_from_its_quota(
    alice: Person, fake_encoder: FakeEncoder, settings: Any
) -> None:
    settings.QUOTA_PRECHECK_CACHE_SECONDS = 60
    queries_of(alice.headers)
    _, sql = queries_of(alice.headers)
    assert not any(s.startswith('SELECT "accounts_quotaperiod"') for s in sql)


def test_it_asks_the_database_again_near_the_quota(
    alice: Person, fake_encoder: FakeEncoder, settings: Any
) -> None:
    from accounts.models import QuotaPeriod

    settings.QUOTA_PRECHECK_CACHE_SECONDS = 60
    Tenant.objects.filter(pk=alice.tenant.pk).update(monthly_token_quota=6)
    queries_of(alice.headers)  # 3 tokens: this worker has seen 3 of 6 spent
    # Another worker charges 2 more. By what this worker saw, 3 + 3 would still fit; but that is
    # within the last 10% of the quota, so it asks, and refuses before the model runs.
    QuotaPeriod.objects.filter(tenant=alice.tenant).update(tokens=5)
    before = fake_encoder.texts_encoded
    assert embed(alice.headers).json()["error"]["code"] == "insufficient_quota"
    assert fake_encoder.texts_encoded == before
