"""Workers remember who a credential is for AUTH_CACHE_SECONDS, and forget at once what is saved."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts import credential_cache, services
from accounts.models import Tenant
from embedplatform.ttl_cache import TtlCache
from tests.conftest import FakeEncoder, Person
from tests.helpers import embed

pytestmark = pytest.mark.django_db


@pytest.fixture
def remembering(settings: Any) -> None:
    settings.AUTH_CACHE_SECONDS = 60


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def queries_of(who: Person | str) -> tuple[int, list[str]]:
    with CaptureQueriesContext(connection) as captured:
        response = embed(who, "a")
    assert response.status_code == 200, response.content
    return len(captured.captured_queries), [q["sql"] for q in captured.captured_queries]


def test_it_resolves_a_known_user_without_asking_the_database_again(
    alice: Person, fake_encoder: FakeEncoder, remembering: None
) -> None:
    first, _ = queries_of(alice)
    again, sql = queries_of(alice)
    assert again < first
    assert not any("accounts_membership" in statement for statement in sql)


def test_it_resolves_a_known_api_key_without_asking_the_database_again(
    alice: Person, fake_encoder: FakeEncoder, remembering: None
) -> None:
    _, raw = services.create_api_key(tenant=alice.tenant, name="server")
    queries_of(raw)
    _, sql = queries_of(raw)
    assert not any("accounts_apikey" in statement for statement in sql)


def test_it_refuses_a_revoked_key_at_once_in_the_worker_that_revoked_it(
    alice: Person, fake_encoder: FakeEncoder, remembering: None
) -> None:
    api_key, raw = services.create_api_key(tenant=alice.tenant, name="server")
    assert embed(raw).status_code == 200
    services.revoke_api_key(api_key=api_key)
    assert embed(raw).json()["error"]["code"] == "revoked_api_key"


def test_it_refuses_a_deactivated_tenant_at_once_in_the_worker_that_saved_it(
    alice: Person, fake_encoder: FakeEncoder, remembering: None
) -> None:
    assert embed(alice, "a").status_code == 200
    tenant = Tenant.objects.get(pk=alice.tenant.pk)
    tenant.is_active = False
    tenant.save()
    assert embed(alice, "a").status_code == 403


def test_it_sees_changes_made_elsewhere_once_its_memory_expires(
    alice: Person, fake_encoder: FakeEncoder, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(
        credential_cache,
        "_entries",
        TtlCache(maxsize=100, ttl=lambda: settings.AUTH_CACHE_SECONDS, clock=clock),
    )
    settings.AUTH_CACHE_SECONDS = 5
    assert embed(alice).status_code == 200
    # An update that fires no signal stands for another worker's change.
    Tenant.objects.filter(pk=alice.tenant.pk).update(is_active=False)
    clock.now += 4.9
    assert embed(alice).status_code == 200
    clock.now += 0.2
    assert embed(alice).status_code == 403


def test_it_skips_the_quota_query_for_a_tenant_far_from_its_quota(
    alice: Person, fake_encoder: FakeEncoder, settings: Any
) -> None:
    settings.QUOTA_PRECHECK_CACHE_SECONDS = 60
    queries_of(alice)
    _, sql = queries_of(alice)
    assert not any(s.startswith('SELECT "accounts_quotaperiod"') for s in sql)


def test_it_asks_the_database_again_near_the_quota(
    alice: Person, fake_encoder: FakeEncoder, settings: Any
) -> None:
    from accounts.models import QuotaPeriod

    settings.QUOTA_PRECHECK_CACHE_SECONDS = 60
    Tenant.objects.filter(pk=alice.tenant.pk).update(monthly_token_quota=6)
    queries_of(alice)  # 3 tokens: this worker has seen 3 of 6 spent
    # Another worker charges 2 more. By what this worker saw, 3 + 3 would still fit; but that is
    # within the last 10% of the quota, so it asks, and refuses before the model runs.
    QuotaPeriod.objects.filter(tenant=alice.tenant).update(tokens=5)
    before = fake_encoder.texts_encoded
    assert embed(alice, "a").json()["error"]["code"] == "insufficient_quota"
    assert fake_encoder.texts_encoded == before


def test_it_forgets_the_least_recently_used_credential_when_full_and_keeps_the_rest() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(maxsize=3, ttl=lambda: 60, clock=clock)
    for number, key in enumerate("abc"):
        cache.put(key, number)
        clock.now += 1
    assert cache.get("a") == 0  # used again: "b" is now the least recently used
    cache.put("d", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), cache.get("d")) == (0, None, 2, 3)
    assert len(cache) == 3


def test_it_forgets_each_entry_its_own_ttl_after_it_was_stored() -> None:
    clock = Clock()
    ttl = [10.0]
    cache: TtlCache[str, str] = TtlCache(maxsize=10, ttl=lambda: ttl[0], clock=clock)
    cache.put("early", "x")
    clock.now += 6
    ttl[0] = 2.0  # a changed setting applies from the next entry on
    cache.put("late", "y")
    clock.now += 1.9
    assert (cache.get("early"), cache.get("late")) == ("x", "y")
    clock.now += 0.2
    assert (cache.get("early"), cache.get("late")) == ("x", None)
    clock.now += 2
    assert cache.get("early") is None
    assert len(cache) == 0


def test_it_remembers_nothing_with_a_ttl_of_zero() -> None:
    cache: TtlCache[str, str] = TtlCache(maxsize=10, ttl=lambda: 0, clock=Clock())
    cache.put("key", "value")
    assert cache.get("key") is None


def test_it_keeps_the_credentials_of_recent_requests_when_the_memory_is_full(
    alice: Person,
    bob: Person,
    fake_encoder: FakeEncoder,
    remembering: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        credential_cache, "_entries", TtlCache(maxsize=2, ttl=lambda: 60, clock=Clock())
    )
    queries_of(alice)  # alice's token and membership fill the memory
    queries_of(bob)  # bob's push alice's out, one at a time
    _, sql = queries_of(bob)
    assert not any("accounts_membership" in statement for statement in sql)
    _, sql = queries_of(alice)
    assert any("accounts_membership" in statement for statement in sql)
