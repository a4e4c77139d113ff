"""Group commit on PostgreSQL (accounts/metering/group_commit.py): requests that charge at the
same moment share one transaction, and each is still charged exactly once, within its quota,
with its usage row, or refused with nothing charged."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import pytest
from django.db import connection, connections
from django.test import override_settings

from accounts.metering import ledger
from accounts.metering.group_commit import tenant_charges
from accounts.models import QuotaPeriod, Tenant, UsageLog
from accounts.selectors import current_period_start
from accounts.services import Caller
from embedplatform import metrics
from embedplatform.errors import QuotaExceeded
from tests.conftest import FakeEncoder, Person
from tests.helpers import at_once, charged, embed, logged

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("group commit is PostgreSQL's")


def unlimited(tenant: Tenant, *, quota: int | None = None) -> None:
    Tenant.objects.filter(pk=tenant.pk).update(
        requests_per_minute=10**6, tokens_per_minute=10**9, monthly_token_quota=quota
    )


def groups() -> tuple[float, float]:
    """(charges, transactions) the writer has committed so far in this process."""
    samples = {
        sample.name: sample.value
        for family in metrics.CHARGE_GROUP_SIZE.collect()
        for sample in family.samples
    }
    return samples["embed_charge_group_size_sum"], samples["embed_charge_group_size_count"]


@contextlib.contextmanager
def quota_row_held(tenant: Tenant) -> Iterator[Callable[[float], None]]:
    """Holds the tenant's quota row in a session of its own, so that the writer's charges wait
    on it, until the block ends or until `release_in(seconds)` lets it go."""
    holder = connections.create_connection("default")
    timers: list[threading.Timer] = []
    try:
        with holder.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute(
                "SELECT tokens FROM accounts_quotaperiod WHERE tenant_id = %s FOR UPDATE",
                [tenant.pk],
            )

            def release_in(seconds: float) -> None:
                timers.append(threading.Timer(seconds, lambda: cursor.execute("ROLLBACK")))
                timers[-1].start()

            yield release_in
            for timer in timers:
                timer.join()
            if not timers:
                cursor.execute("ROLLBACK")
    finally:
        holder.close()


def quota_requests(tenant: Tenant) -> int:
    """The requests charged to the tenant's quota this month."""
    return QuotaPeriod.objects.get(tenant=tenant, period_start=current_period_start()).requests


def record_of(person: Person, tokens: int) -> ledger.UsageRecord:
    return ledger.UsageRecord(
        caller=Caller(user=person.user, tenant=person.tenant),
        endpoint="embed",
        model="fake",
        inputs=1,
        tokens=tokens,
        status_code=200,
        latency_ms=1.0,
        request_id="r1",
    )


@pytest.fixture
def served_once(alice: Person, fake_encoder: FakeEncoder) -> None:
    """Alice with room for any number of requests and one served already: her month's quota
    row exists, and 4 tokens are charged."""
    unlimited(alice.tenant)
    assert embed(alice).status_code == 200


def charge_after(model: Future[str], person: Person, tokens: int) -> ledger.ChargeAfterModel:
    """The charge of a `tokens`-token request of `person`, queued when `model` answers."""
    charge = ledger.charge_after_model(
        future=model, tenant_id=person.tenant.pk, record=lambda: record_of(person, tokens)
    )
    assert charge is not None  # charges are committed in groups here
    return charge


def test_it_commits_concurrent_charges_together_each_exactly_once(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    unlimited(alice.tenant)
    assert embed(alice).status_code == 200  # the month's quota row exists from here on
    charges_before, transactions_before = groups()

    statuses = at_once(lambda _: embed(alice).status_code, range(40))

    assert statuses == [200] * 40
    charges, transactions = groups()
    assert charges - charges_before == 40
    assert transactions - transactions_before < 40  # some shared a transaction
    assert UsageLog.objects.filter(tenant=alice.tenant, status_code=200).count() == 41
    assert charged(alice.tenant) == logged(alice.tenant) == 41 * 4


def test_it_serves_no_more_than_the_quota_holds_when_charges_share_a_transaction(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    unlimited(alice.tenant, quota=10 * 4 + 3)  # room for ten 4-token requests, not eleven
    assert embed(alice).status_code == 200

    statuses = at_once(lambda _: embed(alice).status_code, range(30))

    assert sorted(statuses) == [200] * 9 + [429] * 21
    assert charged(alice.tenant) == logged(alice.tenant) == 10 * 4
    refused = UsageLog.objects.filter(tenant=alice.tenant, status_code=429)
    assert refused.count() == 21
    assert set(refused.values_list("tokens", flat=True)) == {0}


def test_it_replaces_a_writer_connection_the_server_ended_without_failing_a_request(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    unlimited(alice.tenant)
    assert embed(alice).status_code == 200
    with connection.cursor() as cursor:  # every other session of this database: the writer's
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    assert embed(alice).status_code == 200
    assert charged(alice.tenant) == logged(alice.tenant) == 2 * 4


def test_it_answers_503_and_charges_nothing_when_the_database_does_not_answer_in_time(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    unlimited(alice.tenant)
    assert embed(alice).status_code == 200
    with quota_row_held(alice.tenant), override_settings(DATABASE_ROUND_TRIP_SECONDS=1.0):
        response = embed(alice)  # its charge waits on the held row past the round-trip bound

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "database_unavailable"
    assert response["Retry-After"]
    assert embed(alice).status_code == 200  # the writer is back on a fresh connection
    assert charged(alice.tenant) == logged(alice.tenant) == 2 * 4


@pytest.mark.usefixtures("served_once")
def test_it_charges_as_soon_as_the_model_answers_without_the_request_thread(alice: Person) -> None:
    model: Future[str] = Future()
    charge = charge_after(model, alice, 7)

    model.set_result("vectors")  # as the batcher does, from its own thread

    deadline = time.monotonic() + 10  # committed before the request thread asks for anything
    while charged(alice.tenant) != 4 + 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert charged(alice.tenant) == logged(alice.tenant) == 4 + 7
    charge.wait(model, timeout=1)
    charge.settle()
    assert charged(alice.tenant) == logged(alice.tenant) == 4 + 7  # once, not twice


@pytest.mark.usefixtures("served_once")
def test_it_withdraws_the_charge_of_a_request_whose_model_answer_came_too_late(
    alice: Person,
) -> None:
    model: Future[str] = Future()
    charge = charge_after(model, alice, 7)

    with pytest.raises(FutureTimeout):
        charge.wait(model, timeout=0.2)

    assert model.cancelled()  # the batcher skips it, and nothing queues a charge any more
    assert charged(alice.tenant) == logged(alice.tenant) == 4


@pytest.mark.usefixtures("served_once")
def test_it_waits_for_a_charge_already_being_committed_when_the_model_wait_ends(
    alice: Person,
) -> None:
    """A request answered 503 must not have been charged: a charge the writer has taken may
    commit, so the request waits for it and is served instead."""
    model: Future[str] = Future()
    with quota_row_held(alice.tenant) as release_in:
        charge = charge_after(model, alice, 7)
        model.set_result("vectors")
        release_in(1.0)
        charge.wait(model, timeout=0.2)  # past its timeout while the writer commits

    charge.settle()
    assert not model.cancelled()
    assert charged(alice.tenant) == logged(alice.tenant) == 4 + 7


@pytest.mark.usefixtures("served_once")
def test_it_answers_a_request_the_model_failed_and_charges_nothing(alice: Person) -> None:
    model: Future[str] = Future()
    charge = charge_after(model, alice, 7)

    model.set_exception(RuntimeError("the model broke"))

    charge.wait(model, timeout=5)
    with pytest.raises(RuntimeError):
        model.result()
    assert charged(alice.tenant) == logged(alice.tenant) == 4


@pytest.mark.usefixtures("served_once")
def test_it_serves_a_request_whose_charge_waits_behind_another_group_past_the_model_timeout(
    alice: Person,
) -> None:
    """The model's timeout covers the model: once it has answered, a charge queued behind a
    slow group is waited for under the writer's own bound, not refused 503 model_overloaded."""
    first_model: Future[str] = Future()
    second_model: Future[str] = Future()
    with quota_row_held(alice.tenant) as release_in:
        first = charge_after(first_model, alice, 7)
        first_model.set_result("vectors")
        time.sleep(0.5)  # the writer has taken the first charge and waits on the row
        second = charge_after(second_model, alice, 5)
        second_model.set_result("vectors")  # queued behind the first group
        release_in(1.0)
        second.wait(second_model, timeout=0.2)  # past its timeout, still queued
        first.wait(first_model, timeout=0.2)

    first.settle()
    second.settle()
    assert charged(alice.tenant) == logged(alice.tenant) == 4 + 7 + 5


def test_it_makes_one_charge_of_each_tenants_charges_in_a_group() -> None:
    def params(tenant_id: int, tokens: int, request_id: str) -> dict[str, object]:
        return {
            "tenant_id": tenant_id,
            "period_start": "2026-11-01",
            "tokens": tokens,
            "requests": 1,
            "request_id": request_id,
        }

    group = [params(1, 7, "a"), params(2, 3, "b"), params(1, 5, "c"), params(1, 2, "d")]

    first, second = tenant_charges(group, ("tokens", "request_id"))

    assert first.members == [0, 2, 3]
    assert first.params["tenant_id"] == 1
    assert (first.params["tokens"], first.params["requests"]) == (14, 3)
    assert first.rows == [
        {"tokens": 7, "request_id": "a"},
        {"tokens": 5, "request_id": "c"},
        {"tokens": 2, "request_id": "d"},
    ]
    # What SQLite's charge statement is given (its debug cursor cannot quote a list).
    assert not any(isinstance(value, list) for value in first.params.values())
    assert second.members == [1]
    assert (second.params["tokens"], second.params["requests"]) == (3, 1)
    assert second.rows == [{"tokens": 3, "request_id": "b"}]


@pytest.mark.usefixtures("served_once")
def test_it_charges_each_tenant_of_a_shared_group_for_its_own_requests(
    alice: Person, charlie: Person
) -> None:
    unlimited(charlie.tenant)
    assert embed(charlie).status_code == 200
    models = [Future[str]() for _ in range(5)]
    charges_before, transactions_before = groups()
    with quota_row_held(alice.tenant) as release_in:
        first = charge_after(models[0], alice, 7)
        models[0].set_result("vectors")
        time.sleep(0.5)  # the writer has taken the first charge and waits on the row
        queued = [
            charge_after(models[1], alice, 5),
            charge_after(models[2], charlie, 3),
            charge_after(models[3], alice, 2),
            charge_after(models[4], charlie, 6),
        ]
        for model in models[1:]:
            model.set_result("vectors")  # one group behind the first, for two tenants
        release_in(0.2)
        for charge, model in zip([first, *queued], models, strict=True):
            charge.wait(model, timeout=10)
            charge.settle()

    charges, transactions = groups()
    assert (charges - charges_before, transactions - transactions_before) == (5, 2)
    assert charged(alice.tenant) == logged(alice.tenant) == 4 + 7 + 5 + 2
    assert charged(charlie.tenant) == logged(charlie.tenant) == 4 + 3 + 6
    assert quota_requests(alice.tenant) == 4
    assert quota_requests(charlie.tenant) == 3
    rows = UsageLog.objects.filter(tenant=charlie.tenant).values_list("tokens", flat=True)
    assert sorted(rows) == [3, 4, 6]


@pytest.mark.usefixtures("served_once")
def test_it_charges_one_by_one_the_requests_of_a_group_whose_sum_does_not_fit(
    alice: Person,
) -> None:
    Tenant.objects.filter(pk=alice.tenant.pk).update(monthly_token_quota=4 + 1 + 9)
    models = [Future[str]() for _ in range(3)]
    with quota_row_held(alice.tenant) as release_in:
        first = charge_after(models[0], alice, 1)
        models[0].set_result("vectors")
        time.sleep(0.5)  # the writer has taken the first charge and waits on the row
        fits = charge_after(models[1], alice, 6)
        too_many = charge_after(models[2], alice, 5)
        models[1].set_result("vectors")
        models[2].set_result("vectors")  # 11 tokens together: 9 are left
        release_in(0.2)
        for charge, model in zip([first, fits, too_many], models, strict=True):
            charge.wait(model, timeout=10)
        first.settle()
        fits.settle()
        with pytest.raises(QuotaExceeded):
            too_many.settle()

    assert charged(alice.tenant) == logged(alice.tenant) == 4 + 1 + 6
    assert quota_requests(alice.tenant) == 3
