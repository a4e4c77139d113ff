"""Realistic usage for the admin and dashboard tests: many tenants, a month of requests, and the
quota rows that charge_and_log would have left for them."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import connection
from django.db.models import Count, Sum
from django.utils import timezone

from accounts import services
from accounts.models import QuotaPeriod, Tenant, UsageLog
from accounts.selectors import current_period_start

ENDPOINTS = ("embed", "batch_embed", "openai_embeddings")
REFUSALS = (
    (422, "invalid_request_error"),
    (429, "rate_limit_exceeded"),
    (429, "insufficient_quota"),
    (503, "service_unavailable"),
)


@dataclass
class SeededUsage:
    tenants: list[Tenant]
    rows: int


def seed_usage(
    *, tenants: int = 20, rows: int = 100_000, days: int = 30, seed: int = 7
) -> SeededUsage:
    """`rows` usage rows spread over the last `days` days (today included) across `tenants`
    tenants of very different sizes, about 5% of them refused; then this month's quota rows,
    equal to the sum of the month's served rows as the service keeps them."""
    rng = random.Random(seed)
    plan = services.get_default_plan()
    created = Tenant.objects.bulk_create(
        [Tenant(name=f"Tenant {number:02d}", plan=plan) for number in range(1, tenants + 1)]
    )
    # Skewed, so that the ranking of the top tenants is clear-cut.
    weights = [(number + 1) ** 2 for number in range(tenants)]
    tenant_ids = [tenant.pk for tenant in created]
    now = timezone.now()
    start = datetime.combine(
        now.astimezone(UTC).date() - timedelta(days=days - 1), datetime.min.time(), tzinfo=UTC
    )
    span = (now - start).total_seconds()
    picks = rng.choices(tenant_ids, weights=weights, k=rows)
    # Sorted by time, as a live log is appended: the table's physical order then follows
    # created_at, which is what the query plans in production see.
    moments = sorted(start + timedelta(seconds=rng.random() * span) for _ in range(rows))
    values: list[tuple[object, ...]] = []
    for index, (tenant_id, created_at) in enumerate(zip(picks, moments, strict=True)):
        refused = rng.random() < 0.05
        status_code, error_type = rng.choice(REFUSALS) if refused else (200, "")
        inputs = rng.randint(1, 16)
        values.append(
            (
                tenant_id,
                rng.choice(ENDPOINTS),
                "fake-model",
                inputs,
                0 if refused else inputs * rng.randint(4, 60),
                status_code,
                error_type,
                round(rng.lognormvariate(3.0, 0.6), 3),
                f"seed-{seed}-{index:07d}",
                created_at,
            )
        )
    _insert_usage(values)
    charge_quota_from_log()
    return SeededUsage(tenants=created, rows=rows)


_COLUMNS = (
    "tenant_id",
    "endpoint",
    "model",
    "inputs",
    "tokens",
    "status_code",
    "error_type",
    "latency_ms",
    "request_id",
    "created_at",
)


def _insert_usage(values: list[tuple[object, ...]]) -> None:
    """COPY on PostgreSQL (100,000 rows in about a second, where bulk_create takes five);
    bulk_create elsewhere."""
    if connection.vendor != "postgresql":
        UsageLog.objects.bulk_create(
            [UsageLog(**dict(zip(_COLUMNS, row, strict=True))) for row in values],
            batch_size=5_000,
        )
        return
    statement = f"COPY {UsageLog._meta.db_table} ({', '.join(_COLUMNS)}) FROM STDIN"
    with connection.cursor() as cursor, cursor.cursor.copy(statement) as copy:
        for row in values:
            copy.write_row(row)


def charge_quota_from_log() -> None:
    """This month's quota rows, rebuilt from the served rows of the log."""
    period_start = current_period_start()
    month = datetime.combine(period_start, datetime.min.time(), tzinfo=UTC)
    totals = (
        UsageLog.objects.filter(created_at__gte=month, status_code__lt=400, tenant__isnull=False)
        .values("tenant_id")
        .annotate(tokens=Sum("tokens"), requests=Count("id"))
    )
    QuotaPeriod.objects.filter(period_start=period_start).delete()
    QuotaPeriod.objects.bulk_create(
        [
            QuotaPeriod(
                tenant_id=row["tenant_id"],
                period_start=period_start,
                tokens=row["tokens"],
                requests=row["requests"],
            )
            for row in totals
        ]
    )
