"""GET /usage, and the usage log behind it: one row for every embed request that passed
authentication, served ones with their tokens, refused ones with none; each with its request id.

A tenant sees only itself: alice and bob (in alice's team) see the team's numbers, charlie only
his own, and an X-Tenant that is not his is refused."""

from __future__ import annotations

import json
import re
from datetime import UTC, timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from accounts.models import UsageLog
from tests.conftest import FakeEncoder, Person, usage_row
from tests.helpers import assert_error, embed

pytestmark = pytest.mark.django_db


def usage(person: Person, **headers: Any) -> dict[str, Any]:
    response = Client().get("/usage", **person.client_headers, **headers)
    assert response.status_code == 200, response.content
    return dict(response.json())


def today() -> str:
    return timezone.now().astimezone(UTC).date().isoformat()


def test_it_shows_the_plan_limits_and_this_months_use(
    alice: Person, fake_encoder: FakeEncoder, settings: Any
) -> None:
    assert embed(alice, {"text": "hello world"}).status_code == 200  # 4 tokens
    assert embed(alice, {"texts": ["a", "b c"]}, "/batch-embed").status_code == 200  # 3 + 4
    assert embed(alice, {"text": "x", "prompt_name": "nope"}).status_code == 422

    body = usage(alice)

    assert body["tenant"] == {"id": alice.tenant.pk, "name": "Alice's team", "is_active": True}
    assert body["plan"] == {
        "name": "default",
        "requests_per_minute": settings.RATE_LIMIT_PER_MIN,
        "tokens_per_minute": settings.TOKENS_PER_MIN,
        "monthly_token_quota": settings.MONTHLY_TOKEN_QUOTA,
        "max_texts_per_request": settings.MAX_TEXTS_PER_REQUEST,
    }
    period = body["period"]
    assert (period["requests"], period["tokens"]) == (2, 11)
    assert period["remaining_tokens"] == settings.MONTHLY_TOKEN_QUOTA - 11
    assert period["start"] == today()[:8] + "01"
    assert period["end"] > today()
    daily = body["daily"]
    assert len(daily) == 30
    assert daily[-1] == {"date": today(), "requests": 3, "tokens": 11}
    assert all(day["requests"] == day["tokens"] == 0 for day in daily[:-1])


def test_it_totals_the_last_30_days_by_utc_day(alice: Person) -> None:
    now = timezone.now()
    for days_ago, tokens in [(0, 5), (1, 7), (1, 1), (29, 3), (30, 100)]:
        usage_row(
            alice.tenant, user=alice.user, created_at=now - timedelta(days=days_ago), tokens=tokens
        )
    daily = usage(alice)["daily"]
    assert [day["tokens"] for day in daily if day["tokens"]] == [3, 8, 5]
    assert daily[0]["date"] == (now - timedelta(days=29)).astimezone(UTC).date().isoformat()
    assert daily[0]["requests"] == 1
    assert daily[-2]["requests"] == 2


def test_it_shows_a_tenant_only_its_own_usage(
    alice: Person, bob: Person, charlie: Person, fake_encoder: FakeEncoder
) -> None:
    assert embed(alice, {"text": "alice was here"}).status_code == 200  # 5 tokens
    assert embed(bob, {"text": "bob too"}).status_code == 200  # 4 tokens
    assert embed(charlie, {"text": "c"}).status_code == 200  # 3 tokens

    seen_by_alice, seen_by_bob, seen_by_charlie = usage(alice), usage(bob), usage(charlie)

    assert seen_by_alice == seen_by_bob  # one team, one account
    assert seen_by_alice["period"]["tokens"] == 9
    assert seen_by_charlie["tenant"]["id"] == charlie.tenant.pk
    assert seen_by_charlie["period"]["tokens"] == 3
    assert seen_by_charlie["daily"][-1] == {"date": today(), "requests": 1, "tokens": 3}
    charlies_view = json.dumps(seen_by_charlie)
    assert "Alice" not in charlies_view
    assert f'"id": {alice.tenant.pk},' not in charlies_view


def test_it_refuses_charlie_the_usage_of_a_tenant_he_is_not_in(
    alice: Person, charlie: Person, fake_encoder: FakeEncoder
) -> None:
    assert embed(alice, {"text": "private"}).status_code == 200
    response = Client().get("/usage", HTTP_X_TENANT=str(alice.tenant.pk), **charlie.client_headers)
    assert_error(response, 403, error_type="permission_error", code="not_a_member")
    assert "period" not in response.json()
    assert_error(Client().get("/usage"), 401, code="missing_credentials")


def test_it_logs_a_served_request_with_everything_about_it(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    before = timezone.now()
    response = embed(
        alice, {"input": ["one", "two three"]}, "/v1/embeddings", HTTP_X_REQUEST_ID="trace-42"
    )
    assert response.status_code == 200
    assert response["x-request-id"] == "trace-42"
    (row,) = UsageLog.objects.all()
    assert row.tenant == alice.tenant
    assert row.user == alice.user
    assert row.api_key is None
    assert row.endpoint == "openai_embeddings"
    assert row.model == "fake-model"
    assert (row.inputs, row.tokens, row.status_code, row.error_type) == (2, 7, 200, "")
    assert row.latency_ms > 0
    assert row.request_id == "trace-42"
    assert before <= row.created_at <= timezone.now()


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        ({"text": ""}, 422, "invalid_request_error"),
        ({"text": "x", "dimensions": 9999}, 422, "invalid_request_error"),
        ({"text": "x" * 10, "prompt_name": "unknown"}, 422, "invalid_request_error"),
    ],
    ids=["empty-text", "bad-dimensions", "unknown-prompt"],
)
def test_it_logs_a_refused_request_with_no_tokens(
    alice: Person, fake_encoder: FakeEncoder, body: Any, status: int, error_type: str
) -> None:
    response = embed(alice, body)
    assert_error(response, status, error_type=error_type)
    (row,) = UsageLog.objects.all()
    assert (row.status_code, row.tokens, row.error_type) == (status, 0, error_type)
    assert row.request_id == response["x-request-id"]
    assert fake_encoder.texts_encoded == 0


def test_it_generates_a_request_id_when_the_caller_sends_none_or_a_bad_one(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    plain = embed(alice, {"text": "a"})
    odd = embed(alice, {"text": "b"}, HTTP_X_REQUEST_ID="has spaces and <tags>")
    for response in (plain, odd):
        assert re.fullmatch(r"[0-9a-f]{32}", response["x-request-id"])
    assert plain["x-request-id"] != odd["x-request-id"]
    stored = set(UsageLog.objects.values_list("request_id", flat=True))
    assert stored == {plain["x-request-id"], odd["x-request-id"]}


def test_it_writes_no_usage_row_for_requests_that_are_not_authenticated(
    fake_encoder: FakeEncoder,
) -> None:
    response = Client().post(
        "/embed", {"text": "a"}, content_type="application/json", HTTP_X_REQUEST_ID="anon-1"
    )
    assert response.status_code == 401
    assert response["x-request-id"] == "anon-1"
    assert not UsageLog.objects.exists()
