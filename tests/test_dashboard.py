"""The usage dashboard in the admin: /admin/usage/ and /admin/usage/tenant/<id>/."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.db.models import Count, Sum
from django.test import Client
from django.utils import timezone

from accounts import dashboard, services
from accounts import dashboard_selectors as usage
from accounts.models import Plan, QuotaPeriod, UsageLog
from accounts.selectors import current_period_start, next_period_start
from tests.conftest import usage_row
from tests.usage_seed import seed_usage

ROOT = Path(__file__).resolve().parent.parent


class MetricRows(HTMLParser):
    """Reads the dashboard's tables back: for each `<tr data-tenant-id|data-day>` inside the
    element with `id`, the text of its `data-metric` cells."""

    def __init__(self, container_id: str) -> None:
        super().__init__()
        self.container_id = container_id
        self.container_tag = ""
        self.depth = 0  # > 0 while inside the container
        self.rows: list[dict[str, str]] = []
        self.metric: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if self.depth == 0:
            if attributes.get("id") == self.container_id and not self.container_tag:
                self.container_tag, self.depth = tag, 1
            return
        if tag == self.container_tag:
            self.depth += 1
        if tag == "tr" and ("data-tenant-id" in attributes or "data-day" in attributes):
            key = attributes.get("data-tenant-id") or attributes.get("data-day") or ""
            self.rows.append({"key": key})
        if "data-metric" in attributes:
            self.metric = attributes["data-metric"]
            if not self.rows:
                self.rows.append({"key": ""})

    def handle_endtag(self, tag: str) -> None:
        if self.depth and tag == self.container_tag:
            self.depth -= 1
        if tag in ("td", "span"):
            self.metric = None

    def handle_data(self, data: str) -> None:
        if self.depth and self.metric and data.strip():
            self.rows[-1][self.metric] = data.strip()


def metric_rows(html: str, container_id: str) -> list[dict[str, str]]:
    parser = MetricRows(container_id)
    parser.feed(html)
    return parser.rows


def number(text: str) -> int:
    return int(text.replace(",", ""))


# --- Access ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_sends_anonymous_visitors_to_the_admin_login(alice: Any) -> None:
    for url in ("/admin/usage/", f"/admin/usage/tenant/{alice.tenant.pk}/"):
        response = Client().get(url)
        assert response.status_code == 302
        assert response["Location"].startswith(f"/admin/login/?next={url}")


@pytest.mark.django_db
def test_it_refuses_users_who_are_not_staff(alice: Any, django_user_model: Any) -> None:
    member = django_user_model.objects.create_user(username="member", password="x" * 20)
    client = Client()
    client.force_login(member)
    for url in ("/admin/usage/", f"/admin/usage/tenant/{alice.tenant.pk}/"):
        response = client.get(url, follow=True)
        assert response.redirect_chain[0][0].startswith("/admin/login/")
        assert b"not authorized to access this page" in response.content
        assert alice.tenant.name.encode() not in response.content


@pytest.mark.django_db
def test_it_refuses_staff_without_permission_to_view_usage_logs(
    alice: Any, django_user_model: Any
) -> None:
    staff = django_user_model.objects.create_user(username="staff", is_staff=True)
    client = Client()
    client.force_login(staff)
    assert client.get("/admin/usage/").status_code == 403
    assert client.get(f"/admin/usage/tenant/{alice.tenant.pk}/").status_code == 403
    assert b"Usage dashboard" not in client.get("/admin/").content

    staff.user_permissions.add(Permission.objects.get(codename="view_usagelog"))
    client.force_login(django_user_model.objects.get(pk=staff.pk))  # a fresh permission cache
    assert client.get("/admin/usage/").status_code == 200
    assert client.get(f"/admin/usage/tenant/{alice.tenant.pk}/").status_code == 200
    assert b"Usage dashboard" in client.get("/admin/").content


@pytest.mark.django_db
def test_it_answers_404_for_an_unknown_tenant(operator_client: Client) -> None:
    assert operator_client.get("/admin/usage/tenant/999999/").status_code == 404


# --- Figures -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_shows_requests_tokens_errors_and_p95_per_day_for_a_tenant(
    operator_client: Client, alice: Any, charlie: Any
) -> None:
    now = timezone.now()
    for latency in range(10, 30):  # today: 20 requests, latencies 10..29 ms
        usage_row(alice.tenant, tokens=5, latency_ms=float(latency), created_at=now)
    usage_row(
        alice.tenant, tokens=0, status_code=429, error_type="rate_limit_exceeded", created_at=now
    )
    usage_row(alice.tenant, tokens=7, latency_ms=100.0, created_at=now - timedelta(days=1))
    usage_row(alice.tenant, tokens=1000, created_at=now - timedelta(days=40))  # outside the window
    usage_row(charlie.tenant, tokens=999, created_at=now)  # somebody else's

    response = operator_client.get(f"/admin/usage/tenant/{alice.tenant.pk}/")

    assert response.status_code == 200
    window = response.context["window"]
    today, yesterday = window.days[-1], window.days[-2]
    assert len(window.days) == 30
    assert today.day == now.astimezone(UTC).date()
    assert (today.requests, today.tokens, today.errors) == (21, 100, 1)
    # percentile_cont over 21 latencies: 10..29 and the refused request's 20.0
    assert today.p95_latency_ms == pytest.approx(28.0)
    assert (yesterday.requests, yesterday.tokens, yesterday.errors) == (1, 7, 0)
    assert yesterday.p95_latency_ms == pytest.approx(100.0)
    assert (window.requests, window.tokens, window.errors) == (22, 107, 1)
    assert all(day.requests == 0 for day in window.days[:-2])

    html = response.content.decode()
    totals = metric_rows(html, "usage-totals")[0]
    assert (number(totals["requests"]), number(totals["tokens"])) == (22, 107)
    assert number(totals["errors"]) == 1
    daily = {row["key"]: row for row in metric_rows(html, "usage-daily")}
    assert number(daily[today.day.isoformat()]["requests"]) == 21
    assert daily[today.day.isoformat()]["p95"] == "28.0 ms"
    assert daily[yesterday.day.isoformat()]["tokens"] == "7"
    assert "Charlie" not in html


@pytest.mark.django_db
def test_it_adds_every_tenant_up_on_the_overview(
    operator_client: Client, alice: Any, charlie: Any
) -> None:
    now = timezone.now()
    usage_row(alice.tenant, tokens=30, created_at=now)
    usage_row(charlie.tenant, tokens=12, created_at=now)
    usage_row(charlie.tenant, tokens=0, status_code=503, error_type="service_unavailable")
    usage_row(None, tokens=0, status_code=401, error_type="authentication_error")

    response = operator_client.get("/admin/usage/")

    window = response.context["window"]
    assert (window.requests, window.tokens, window.errors) == (4, 42, 2)
    breakdowns = response.context["breakdowns"]
    assert [(row.label, row.requests, row.tokens, row.errors) for row in breakdowns.endpoints] == [
        ("embed", 4, 42, 2)
    ]
    assert {(row.status_code, row.error_type, row.count) for row in breakdowns.errors} == {
        (503, "service_unavailable", 1),
        (401, "authentication_error", 1),
    }


@pytest.mark.django_db
def test_it_ranks_the_top_tenants_by_tokens_this_month(
    operator_client: Client, alice: Any, charlie: Any
) -> None:
    quiet = services.create_tenant(name="Quiet tenant")
    now = timezone.now()
    month_start = datetime.combine(current_period_start(), datetime.min.time(), tzinfo=UTC)
    usage_row(alice.tenant, tokens=300, created_at=now)
    usage_row(alice.tenant, tokens=0, status_code=422, error_type="invalid_request_error")
    usage_row(charlie.tenant, tokens=200, created_at=now)
    usage_row(charlie.tenant, tokens=250, created_at=now)
    # Last month counts in the 30 days but not in this month's ranking.
    usage_row(quiet, tokens=10_000, created_at=month_start - timedelta(seconds=1))

    response = operator_client.get("/admin/usage/")

    rows = metric_rows(response.content.decode(), "top-tenants")
    assert [int(row["key"]) for row in rows] == [charlie.tenant.pk, alice.tenant.pk]
    assert [
        (number(row["tokens"]), number(row["requests"]), number(row["errors"])) for row in rows
    ] == [
        (450, 2, 0),
        (300, 2, 1),
    ]


@pytest.mark.django_db
def test_it_shows_quota_use_against_each_tenants_effective_quota(
    operator_client: Client, alice: Any, charlie: Any, settings: Any
) -> None:
    settings.MONTHLY_TOKEN_QUOTA = 2_000_000
    small = Plan.objects.create(name="small", monthly_token_quota=5_000)
    charlie.tenant.plan = small
    charlie.tenant.save()
    override = services.create_tenant(name="Override tenant", plan=small)
    override.monthly_token_quota = 1_000
    override.save()
    period = current_period_start()
    QuotaPeriod.objects.create(tenant=alice.tenant, period_start=period, tokens=500_000, requests=9)
    QuotaPeriod.objects.create(tenant=charlie.tenant, period_start=period, tokens=1_000, requests=3)
    QuotaPeriod.objects.create(tenant=override, period_start=period, tokens=1_000, requests=4)
    QuotaPeriod.objects.create(
        tenant=override, period_start=period - timedelta(days=40), tokens=77, requests=1
    )

    overview = operator_client.get("/admin/usage/").content.decode()
    rows = metric_rows(overview, "quota-use")

    # Fullest first: the override (1,000 of 1,000), alice (default), charlie (plan).
    assert [int(row["key"]) for row in rows] == [override.pk, alice.tenant.pk, charlie.tenant.pk]
    assert [
        (number(row["quota-tokens"]), number(row["quota-limit"]), row["quota-percent"])
        for row in rows
    ] == [(1_000, 1_000, "100.0%"), (500_000, 2_000_000, "25.0%"), (1_000, 5_000, "20.0%")]

    page = operator_client.get(f"/admin/usage/tenant/{charlie.tenant.pk}/").content.decode()
    quota = {key: value for row in metric_rows(page, "tenant-quota") for key, value in row.items()}
    assert number(quota["quota-tokens"]) == 1_000
    assert number(quota["quota-limit"]) == 5_000
    assert number(quota["quota-remaining"]) == 4_000
    assert number(quota["quota-requests"]) == 3


# --- Charts and links --------------------------------------------------------------------------


def test_it_scales_chart_bars_to_the_busiest_day() -> None:
    today = datetime(2026, 3, 31, tzinfo=UTC).date()
    days = [
        usage.DailyUsage(
            day=today - timedelta(days=29 - n), requests=0, tokens=0, errors=0, p95_latency_ms=None
        )
        for n in range(30)
    ]
    days[-1] = usage.DailyUsage(day=today, requests=100, tokens=0, errors=25, p95_latency_ms=9.0)
    days[-2] = usage.DailyUsage(
        day=today - timedelta(days=1), requests=50, tokens=0, errors=0, p95_latency_ms=3.0
    )

    requests_chart = dashboard.usage_charts(
        usage.UsageWindow(days=days, requests=150, tokens=0, errors=25, p95_latency_ms=8.0)
    )[0]

    busiest, second = requests_chart.bars[-1], requests_chart.bars[-2]
    assert [rect.tone for rect in busiest.rects] == ["primary", "error"]
    served, errors = busiest.rects
    assert served.height == pytest.approx(3 * errors.height, rel=0.02)
    assert second.rects[0].height == pytest.approx((served.height + errors.height) / 2, rel=0.02)
    assert all(not bar.rects for bar in requests_chart.bars[:-2])
    assert requests_chart.y_ticks[-1].label == "100"
    assert requests_chart.x_ticks[-1].label == "Mar 31"
    assert busiest.title == "Tue Mar 31: 100 requests, 25 errors"
    assert [dashboard.nice_step(value) for value in (0, 7, 100, 450, 12_345)] == [
        1.0,
        2.0,
        25.0,
        200.0,
        5_000.0,
    ]


@pytest.mark.django_db
def test_it_draws_charts_on_the_server_with_nothing_fetched_from_elsewhere(
    operator_client: Client, alice: Any, settings: Any
) -> None:
    settings.PROMETHEUS_URL = "http://prometheus.internal:9090"
    usage_row(alice.tenant, tokens=10)

    for url in ("/admin/usage/", f"/admin/usage/tenant/{alice.tenant.pk}/"):
        html = operator_client.get(url).content.decode()
        charts = re.findall(r'<figure class="usage-chart[ "].*?</figure>', html, re.S)
        assert len(charts) == 3
        assert all(chart.count("<svg") == 1 and chart.count("<rect") > 30 for chart in charts)
        # Scripts, styles and images all come from this server; the one way out is a link.
        assert re.findall(r'(?:src|href)="((?:https?:)?//[^"]*)"', html) == [
            "http://prometheus.internal:9090"
        ]


@pytest.mark.django_db
def test_it_links_the_dashboard_from_every_admin_page(
    operator_client: Client, settings: Any
) -> None:
    settings.PROMETHEUS_URL = "http://prometheus.internal:9090"
    index = operator_client.get("/admin/").content.decode()
    assert 'href="/admin/usage/"' in index
    assert 'href="http://prometheus.internal:9090"' in index
    tenants = operator_client.get("/admin/accounts/tenant/").content.decode()
    assert 'href="/admin/usage/"' in tenants


# --- Speed -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_renders_every_usage_page_in_under_a_second_with_100k_rows(
    operator_client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    seeded = seed_usage(tenants=20, rows=100_000, days=30)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {UsageLog._meta.db_table}")  # as autovacuum does after a load
    assert UsageLog.objects.count() == 100_000
    busiest = seeded.tenants[-1]
    pages = {
        "dashboard": "/admin/usage/",
        "tenant dashboard": f"/admin/usage/tenant/{busiest.pk}/",
        "usage log": "/admin/accounts/usagelog/",
        "usage log of a tenant": f"/admin/accounts/usagelog/?tenant__id__exact={busiest.pk}",
        "usage log, failed, this month": "/admin/accounts/usagelog/?"
        + urlencode(
            {
                "status": "server_error",
                "created_at__gte": f"{current_period_start()} 00:00:00+00:00",
                "created_at__lt": f"{next_period_start()} 00:00:00+00:00",
            }
        ),
        "usage log search": "/admin/accounts/usagelog/?q=seed-7-0054321",
        "tenants": "/admin/accounts/tenant/",
    }
    operator_client.get("/admin/")  # templates compiled, URLs resolved: the page, not the start

    timings = {}
    for name, url in pages.items():
        started = time.perf_counter()
        response = operator_client.get(url)
        timings[name] = time.perf_counter() - started
        assert response.status_code == 200, name

    with capsys.disabled():
        print("\nrender times with 100,000 usage rows:")
        for name, seconds in timings.items():
            print(f"  {name:32} {seconds * 1000:7.1f} ms")
    assert {name: seconds for name, seconds in timings.items() if seconds >= 1.0} == {}

    # And the figures are those of the database.
    response = operator_client.get("/admin/usage/")
    month_start = datetime.combine(current_period_start(), datetime.min.time(), tzinfo=UTC)
    expected = list(
        UsageLog.objects.filter(created_at__gte=month_start)
        .values("tenant_id")
        .annotate(tokens=Sum("tokens"), requests=Count("id"))
        .order_by("-tokens")[:10]
    )
    rows = metric_rows(response.content.decode(), "top-tenants")
    assert [(int(row["key"]), number(row["tokens"])) for row in rows] == [
        (row["tenant_id"], row["tokens"]) for row in expected
    ]
    assert response.context["window"].requests == 100_000
