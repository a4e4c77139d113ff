"""Monthly token quotas: a request that would pass the quota is refused with 429
`insufficient_quota` before the model runs, months are calendar months in UTC, and what is
charged always equals the usage log, even with 32 requests racing for the last tokens of a real
gunicorn service."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.test import Client

from accounts.metering import ledger
from accounts.models import Plan, QuotaPeriod, Tenant, UsageLog
from accounts.selectors import (
    PeriodUse,
    current_period_start,
    effective_limits,
    next_period_start,
    period_use,
    quota_periods,
)
from tests.conftest import FakeEncoder, Person
from tests.helpers import assert_error, charged, embed, logged
from tests.service import Service, start_service


def spend(tenant: Tenant, tokens: int, *, month: date | None = None) -> None:
    QuotaPeriod.objects.update_or_create(
        tenant=tenant,
        period_start=month or current_period_start(),
        defaults={"tokens": tokens, "requests": 1},
    )


def set_quota(tenant: Tenant, tokens: int) -> None:
    Tenant.objects.filter(pk=tenant.pk).update(monthly_token_quota=tokens)


@pytest.mark.django_db
def test_it_refuses_a_request_that_would_pass_the_quota_before_the_model_runs(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    set_quota(alice.tenant, 10)
    spend(alice.tenant, 8)

    response = embed(alice)

    error = assert_error(response, 429, error_type="insufficient_quota", code="insufficient_quota")
    assert "needs 4 tokens but only 2" in error["message"]
    assert fake_encoder.texts_encoded == 0
    assert charged(alice.tenant) == 8
    (row,) = UsageLog.objects.all()
    assert (row.status_code, row.tokens, row.error_type) == (429, 0, "insufficient_quota")


@pytest.mark.django_db
def test_it_serves_a_request_that_exactly_fills_the_quota_and_no_more(
    alice: Person, bob: Person, fake_encoder: FakeEncoder
) -> None:
    set_quota(alice.tenant, 10)
    spend(alice.tenant, 6)
    assert embed(alice).status_code == 200
    assert charged(alice.tenant) == 10
    # The quota is the tenant's: bob, in alice's team, finds it spent too.
    assert_error(embed(bob, "a"), 429, code="insufficient_quota")
    assert fake_encoder.texts_encoded == 1


@pytest.mark.django_db
def test_it_starts_afresh_each_calendar_month(alice: Person, fake_encoder: FakeEncoder) -> None:
    set_quota(alice.tenant, 10)
    last_month = (current_period_start() - timedelta(days=1)).replace(day=1)
    spend(alice.tenant, 10, month=last_month)
    assert embed(alice).status_code == 200
    assert charged(alice.tenant) == 4
    assert QuotaPeriod.objects.get(tenant=alice.tenant, period_start=last_month).tokens == 10


def test_it_counts_months_in_utc() -> None:
    # 23:30 on 31 March in New York (UTC-4 then) is already April in UTC.
    new_york_evening = datetime(2025, 3, 31, 23, 30, tzinfo=timezone(timedelta(hours=-4)))
    assert current_period_start(new_york_evening) == date(2025, 4, 1)
    assert current_period_start(datetime(2025, 4, 30, 23, 59, 59, tzinfo=UTC)) == date(2025, 4, 1)
    assert next_period_start(datetime(2025, 12, 31, 12, tzinfo=UTC)) == date(2026, 1, 1)
    assert next_period_start(datetime(2025, 1, 31, tzinfo=UTC)) == date(2025, 2, 1)


@pytest.mark.django_db
def test_it_takes_the_tenants_quota_over_the_plans_over_the_setting(
    alice: Person, settings: Any
) -> None:
    settings.MONTHLY_TOKEN_QUOTA = 1000
    assert effective_limits(alice.tenant).monthly_token_quota == 1000
    plan = Plan.objects.create(name="small", monthly_token_quota=100)
    Tenant.objects.filter(pk=alice.tenant.pk).update(plan=plan)
    alice.tenant.refresh_from_db()
    assert effective_limits(alice.tenant).monthly_token_quota == 100
    set_quota(alice.tenant, 5)
    alice.tenant.refresh_from_db()
    assert effective_limits(alice.tenant).monthly_token_quota == 5


@pytest.mark.django_db
def test_it_caps_the_texts_per_request_of_any_plan_or_tenant_at_the_service_setting(
    alice: Person, fake_encoder: FakeEncoder, settings: Any
) -> None:
    settings.MAX_TEXTS_PER_REQUEST = 5
    generous = Plan.objects.create(name="generous", max_texts_per_request=100)
    Tenant.objects.filter(pk=alice.tenant.pk).update(plan=generous)
    alice.tenant.refresh_from_db()
    assert effective_limits(alice.tenant).max_texts_per_request == 5
    Tenant.objects.filter(pk=alice.tenant.pk).update(max_texts_per_request=50)
    alice.tenant.refresh_from_db()
    assert effective_limits(alice.tenant).max_texts_per_request == 5

    response = Client().post(
        "/batch-embed",
        {"texts": ["a"] * 6},
        content_type="application/json",
        **alice.client_headers,
    )
    assert_error(response, 413, code="too_many_inputs", param="texts")
    assert fake_encoder.texts_encoded == 0
    # Below the setting, the plan's or the tenant's own limit holds.
    Tenant.objects.filter(pk=alice.tenant.pk).update(max_texts_per_request=3)
    alice.tenant.refresh_from_db()
    assert effective_limits(alice.tenant).max_texts_per_request == 3


@pytest.mark.django_db
def test_it_reads_a_tenants_charges_of_a_period_from_its_quota_row(
    alice: Person, charlie: Person
) -> None:
    last_month = (current_period_start() - timedelta(days=1)).replace(day=1)
    QuotaPeriod.objects.create(tenant=alice.tenant, period_start=last_month, tokens=7, requests=2)
    QuotaPeriod.objects.create(
        tenant=alice.tenant, period_start=current_period_start(), tokens=40, requests=3
    )
    assert period_use(tenant=alice.tenant, period_start=current_period_start()) == PeriodUse(
        tokens=40, requests=3
    )
    assert period_use(tenant=alice.tenant, period_start=last_month) == PeriodUse(
        tokens=7, requests=2
    )
    assert period_use(tenant=charlie.tenant, period_start=current_period_start()) == PeriodUse(
        tokens=0, requests=0
    )
    this_month = quota_periods(period_start=current_period_start())
    assert list(this_month.values_list("tenant", "tokens")) == [(alice.tenant.pk, 40)]


@pytest.mark.django_db
def test_it_charges_exactly_what_it_served(
    alice: Person, bob: Person, charlie: Person, fake_encoder: FakeEncoder
) -> None:
    for person, text in [(alice, "a b c"), (bob, "d"), (charlie, "e f"), (alice, "g")]:
        assert embed(person, text).status_code == 200
    Client().post("/embed", {"text": ""}, content_type="application/json", **alice.client_headers)
    assert charged(alice.tenant) == logged(alice.tenant) == 5 + 3 + 3
    assert charged(charlie.tenant) == logged(charlie.tenant) == 4
    period = QuotaPeriod.objects.get(tenant=alice.tenant)
    assert period.requests == UsageLog.objects.filter(tenant=alice.tenant, tokens__gt=0).count()


# --- Under real concurrency --------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """gunicorn with two workers of 32 threads each, serving the bundled MiniLM."""
    started = start_service(
        tmp_path_factory.mktemp("quota"),
        workers=2,
        env={"MODEL_QUANTIZATION": "fp32", "RATE_LIMIT_PER_MIN": "10000"},
    )
    yield started
    started.stop()


@pytest.mark.service
@pytest.mark.django_db(transaction=True)
def test_it_never_charges_past_the_quota_with_32_concurrent_requests(
    service: Service, alice: Person, tmp_path: Path
) -> None:
    headers = alice.headers
    body = {"text": "the last tokens of the month"}
    first = service.post("/embed", json=body, headers=headers)
    assert first.status_code == 200, first.text
    per_request = first.json()["usage"]["total_tokens"]
    # Room for exactly five more requests, and one token short of a sixth.
    quota = per_request + 5 * per_request + (per_request - 1)
    set_quota(alice.tenant, quota)

    def send(_: int) -> Any:
        return service.post("/embed", json=body, headers=headers)

    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(send, range(32)))

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * 5 + [429] * 27, [r.text for r in responses if r.status_code >= 500]
    for response in responses:
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "insufficient_quota"
    spent = charged(alice.tenant)
    assert spent == 6 * per_request <= quota
    assert spent == logged(alice.tenant)
    rows = UsageLog.objects.filter(tenant=alice.tenant)
    assert rows.count() == 33
    assert rows.filter(status_code=200).count() == 6
    assert set(rows.filter(status_code=429).values_list("tokens", "error_type")) == {
        (0, "insufficient_quota")
    }
    assert QuotaPeriod.objects.get(tenant=alice.tenant).requests == 6


@pytest.mark.django_db
@pytest.mark.usefixtures("frozen_rate_window")
def test_it_leaves_the_minutes_token_budget_alone_when_the_quota_refuses(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    set_quota(alice.tenant, 10)
    spend(alice.tenant, 8)
    Tenant.objects.filter(pk=alice.tenant.pk).update(tokens_per_minute=100)
    assert_error(embed(alice), 429, code="insufficient_quota")
    set_quota(alice.tenant, 1000)
    served = embed(alice)
    assert served.status_code == 200
    # Only the served request's 4 tokens count against the minute, not the refused one's.
    assert served["x-ratelimit-remaining-tokens"] == "96"


@pytest.mark.service
@pytest.mark.django_db(transaction=True)
def test_it_serves_a_fresh_tenants_simultaneous_first_requests_of_the_month(
    service: Service, charlie: Person
) -> None:
    # Nobody has charged charlie's tenant this month: the month's quota row does not exist yet,
    # and all 16 requests race to create it.
    assert not QuotaPeriod.objects.filter(tenant=charlie.tenant).exists()
    body = {"text": "first of the month"}
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(
            pool.map(
                lambda _: service.post("/embed", json=body, headers=charlie.headers), range(16)
            )
        )
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses]
    period = QuotaPeriod.objects.get(tenant=charlie.tenant)
    assert period.requests == 16
    assert (
        period.tokens
        == logged(charlie.tenant)
        == sum(r.json()["usage"]["total_tokens"] for r in responses)
    )


LOWER_QUOTA_ELSEWHERE = """
import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as connection:
    connection.execute(sys.argv[2], (int(sys.argv[3]), int(sys.argv[4])))
"""


def lower_quota_in_another_process(*, table: str, pk: int, tokens: int) -> None:
    """What the admin in another worker or an operator's script does: a committed UPDATE from a
    process this one cannot hear (no signal clears its caches)."""
    import subprocess
    import sys

    from django.db import connection

    settings_dict = connection.settings_dict
    dsn = (
        f"host={settings_dict['HOST']} port={settings_dict['PORT'] or 5432} "
        f"user={settings_dict['USER']} dbname={settings_dict['NAME']}"
    )
    statement = f"UPDATE {table} SET monthly_token_quota = %s WHERE id = %s"
    subprocess.run(
        [sys.executable, "-c", LOWER_QUOTA_ELSEWHERE, dsn, statement, str(tokens), str(pk)],
        check=True,
        timeout=30,
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("where", ["tenant", "plan"])
def test_it_charges_against_a_quota_lowered_by_another_process_on_the_next_request(
    alice: Person, fake_encoder: FakeEncoder, settings: Any, where: str
) -> None:
    """Every cache on: the credentials (tenant and plan) and the quota pre-check remember a
    generous quota; the charge still reads the live rows."""
    settings.AUTH_CACHE_SECONDS = 60
    settings.QUOTA_PRECHECK_CACHE_SECONDS = 60
    assert embed(alice).status_code == 200
    assert embed(alice).status_code == 200  # now served from every cache
    if where == "tenant":
        lower_quota_in_another_process(table=Tenant._meta.db_table, pk=alice.tenant.pk, tokens=9)
    else:
        plan = alice.tenant.plan
        lower_quota_in_another_process(table=Plan._meta.db_table, pk=plan.pk, tokens=9)

    response = embed(alice)  # 8 + 4 would pass 9

    assert_error(response, 429, error_type="insufficient_quota", code="insufficient_quota")
    assert "of 9 remain" in response.json()["error"]["message"]
    assert charged(alice.tenant) == logged(alice.tenant) == 8
    assert UsageLog.objects.filter(tenant=alice.tenant, status_code=429, tokens=0).count() == 1


@pytest.mark.django_db
def test_it_has_postgresql_keep_the_charge_prepared_after_a_few_requests(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    # Parsing and planning the charge was a third of PostgreSQL's CPU per request.
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("prepared statements are PostgreSQL's")
    for _ in range(7):
        assert embed(alice).status_code == 200
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [row[0] for row in cursor.fetchall()]
    assert any("UPDATE accounts_quotaperiod" in statement for statement in prepared), prepared
    assert charged(alice.tenant) == logged(alice.tenant) > 0


# --- SQLite's one writer ------------------------------------------------------------------------


def database(vendor: str, *, in_transaction: bool = False, timeout: float = 5.0) -> Any:
    return SimpleNamespace(
        vendor=vendor,
        in_atomic_block=in_transaction,
        settings_dict={"OPTIONS": {"timeout": timeout}},
    )


def test_it_lets_a_process_write_to_sqlite_one_transaction_at_a_time() -> None:
    sqlite = database("sqlite")
    first_in, release, second_in = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with ledger.writes_in_turn(sqlite):
            first_in.set()
            release.wait(5)

    def second() -> None:
        first_in.wait(5)
        with ledger.writes_in_turn(sqlite):
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    assert first_in.wait(5)
    assert not second_in.wait(0.3)  # its turn comes only when the first has committed
    release.set()
    assert second_in.wait(5)
    for thread in threads:
        thread.join(5)


@pytest.mark.parametrize(
    "db",
    [database("postgresql"), database("sqlite", in_transaction=True)],
    ids=["postgresql", "sqlite inside an open transaction"],
)
def test_it_makes_no_write_wait_its_turn_on_postgresql_or_inside_a_transaction(db: Any) -> None:
    entered = threading.Event()

    def write() -> None:
        with ledger.writes_in_turn(db):
            entered.set()

    with ledger.writes_in_turn(database("sqlite")):  # another write holds the turn
        thread = threading.Thread(target=write)
        thread.start()
        assert entered.wait(5)
    thread.join(5)


def test_it_waits_for_its_turn_no_longer_than_the_busy_timeout() -> None:
    entered = threading.Event()

    def write() -> None:
        with ledger.writes_in_turn(database("sqlite", timeout=0.2)):
            entered.set()

    # A write stuck in its turn must not stall the others: past the busy timeout the next one
    # goes ahead, and SQLite's own lock (with the same timeout) decides.
    with ledger.writes_in_turn(database("sqlite")):
        thread = threading.Thread(target=write)
        thread.start()
        assert entered.wait(5)
    thread.join(5)
