"""Reads for the operators' usage dashboard: daily totals and latency percentiles over the usage
log, the month's top tenants, and quota use per tenant.

Every read is one grouped query over a time range of the log, which the (created_at) and
(tenant, created_at) indexes serve. PostgreSQL computes percentiles in the database
(percentile_cont); other databases (the embedded SQLite default) get the same figure computed in
Python from the latencies of the range.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.db import NotSupportedError, connection
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Aggregate, Count, FloatField, Q, QuerySet, Sum
from django.utils import timezone

from accounts.models import Tenant, UsageLog
from accounts.selectors import current_period_start, effective_limits, period_use, quota_periods

if TYPE_CHECKING:
    from django.db.models.sql.compiler import SQLCompiler, _AsSqlType

WINDOW_DAYS = 30
LATENCY_PERCENTILE = 0.95
_ERROR = Q(status_code__gte=400)


class PercentileCont(Aggregate):
    """PostgreSQL's continuous percentile: `percentile_cont(f) WITHIN GROUP (ORDER BY x)`."""

    function = "PERCENTILE_CONT"
    name = "PercentileCont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression: Any, *, fraction: float, **extra: Any) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError("fraction must be between 0 and 1")
        # A float literal from code, never from a request, so it can sit in the SQL text.
        super().__init__(expression, fraction=repr(float(fraction)), **extra)

    def as_sql(
        self,
        compiler: SQLCompiler,
        connection: BaseDatabaseWrapper,
        function: str | None = None,
        template: str | None = None,
        arg_joiner: str | None = None,
        **extra_context: Any,
    ) -> _AsSqlType:
        if connection.vendor != "postgresql":
            raise NotSupportedError(
                "PERCENTILE_CONT needs PostgreSQL; elsewhere, percentile_cont() computes it."
            )
        # Aggregate.as_sql takes these as keywords only (its stub inherits Func's signature).
        return super().as_sql(
            compiler,
            connection,
            function=function,
            template=template,
            arg_joiner=arg_joiner,
            **extra_context,
        )


def percentile_cont(values: Sequence[float], fraction: float) -> float | None:
    """The `fraction` percentile of `values` with linear interpolation between the two nearest
    ranks, exactly as PostgreSQL's percentile_cont computes it; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower = math.floor(position)
    upper = math.ceil(position)
    if lower == upper:
        return float(ordered[lower])
    weight = position - lower
    return float(ordered[lower] + (ordered[upper] - ordered[lower]) * weight)


def _supports_percentile() -> bool:
    return connection.vendor == "postgresql"


@dataclass(frozen=True)
class DailyUsage:
    day: date
    requests: int
    tokens: int
    errors: int
    p95_latency_ms: float | None


@dataclass(frozen=True)
class UsageWindow:
    """The last `len(days)` UTC days up to today, every day present (zeros where idle)."""

    days: list[DailyUsage]
    requests: int
    tokens: int
    errors: int
    p95_latency_ms: float | None

    @property
    def start(self) -> date:
        return self.days[0].day

    @property
    def end(self) -> date:
        return self.days[-1].day

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def window_start(*, days: int = WINDOW_DAYS, now: datetime | None = None) -> datetime:
    """Midnight UTC of the first day of a `days`-day window that ends today."""
    today = (now or timezone.now()).astimezone(UTC).date()
    return datetime.combine(today - timedelta(days=days - 1), datetime.min.time(), tzinfo=UTC)


def _log_since(*, since: datetime, tenant: Tenant | None) -> QuerySet[UsageLog]:
    logs = UsageLog.objects.filter(created_at__gte=since)
    return logs.filter(tenant=tenant) if tenant is not None else logs


def usage_window(
    *, tenant: Tenant | None = None, days: int = WINDOW_DAYS, now: datetime | None = None
) -> UsageWindow:
    """Requests, tokens, errors and p95 latency per day over the last `days` days, of one tenant
    or of the whole service."""
    since = window_start(days=days, now=now)
    first_day = since.date()
    logs = _log_since(since=since, tenant=tenant)
    if _supports_percentile():
        by_day = _daily_usage_postgresql(first_day=first_day, days=days, tenant=tenant)
        overall_p95 = logs.aggregate(p95=PercentileCont("latency_ms", fraction=LATENCY_PERCENTILE))[
            "p95"
        ]
    else:
        by_day, overall_p95 = daily_usage_portable(logs, first_day=first_day, days=days)
    daily = [
        by_day.get(day) or DailyUsage(day=day, requests=0, tokens=0, errors=0, p95_latency_ms=None)
        for day in (first_day + timedelta(days=offset) for offset in range(days))
    ]
    return UsageWindow(
        days=daily,
        requests=sum(day.requests for day in daily),
        tokens=sum(day.tokens for day in daily),
        errors=sum(day.errors for day in daily),
        p95_latency_ms=overall_p95,
    )


def _daily_usage_postgresql(
    *, first_day: date, days: int, tenant: Tenant | None
) -> dict[date, DailyUsage]:
    """One aggregate per day, each over an index range of that day's rows: grouping the whole
    window by a computed day instead would sort every row of it (on disk, past work_mem) before
    the percentiles could sort them again."""
    table = UsageLog._meta.db_table
    tenant_condition = "AND tenant_id = %(tenant)s" if tenant is not None else ""
    sql = f"""
        SELECT days.day::date, usage.requests, usage.tokens, usage.errors, usage.p95
        FROM generate_series(%(first)s::timestamp, %(last)s::timestamp, interval '1 day')
            AS days(day)
        CROSS JOIN LATERAL (
            SELECT count(*) AS requests,
                   coalesce(sum(tokens), 0) AS tokens,
                   count(*) FILTER (WHERE status_code >= 400) AS errors,
                   percentile_cont(%(fraction)s) WITHIN GROUP (ORDER BY latency_ms) AS p95
            FROM {table}
            WHERE created_at >= days.day AT TIME ZONE 'UTC'
              AND created_at < (days.day + interval '1 day') AT TIME ZONE 'UTC'
              {tenant_condition}
        ) AS usage
    """
    params: dict[str, Any] = {
        "first": first_day,
        "last": first_day + timedelta(days=days - 1),
        "fraction": LATENCY_PERCENTILE,
        "tenant": tenant.pk if tenant is not None else None,
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {
            day: DailyUsage(
                day=day, requests=requests, tokens=int(tokens), errors=errors, p95_latency_ms=p95
            )
            for day, requests, tokens, errors, p95 in cursor.fetchall()
        }


def daily_usage_portable(
    logs: QuerySet[UsageLog], *, first_day: date, days: int
) -> tuple[dict[date, DailyUsage], float | None]:
    """The same figures on any database (the embedded SQLite has no percentile_cont): per day,
    over the created_at index, the totals in SQL and the latencies as bare floats, whose
    percentiles Python computes. Grouping by a computed day instead would call SQLite's Python
    date function on every row, and fetching datetimes would parse every one."""
    by_day: dict[date, DailyUsage] = {}
    every_latency: list[float] = []
    for offset in range(days):
        day = first_day + timedelta(days=offset)
        start = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
        day_logs = logs.filter(created_at__gte=start, created_at__lt=start + timedelta(days=1))
        totals = day_logs.aggregate(
            requests=Count("id"), tokens=Sum("tokens"), errors=Count("id", filter=_ERROR)
        )
        if not totals["requests"]:
            continue
        latencies = list(day_logs.values_list("latency_ms", flat=True).order_by())
        every_latency.extend(latencies)
        by_day[day] = DailyUsage(
            day=day,
            requests=totals["requests"],
            tokens=totals["tokens"] or 0,
            errors=totals["errors"],
            p95_latency_ms=percentile_cont(latencies, LATENCY_PERCENTILE),
        )
    return by_day, percentile_cont(every_latency, LATENCY_PERCENTILE)


@dataclass(frozen=True)
class TenantMonth:
    tenant: Tenant
    requests: int
    tokens: int
    errors: int


def top_tenants(*, limit: int = 10, now: datetime | None = None) -> list[TenantMonth]:
    """The tenants that used the most tokens this calendar month (the quota period), with their
    logged requests and errors; ties go to the busier tenant."""
    month_start = datetime.combine(current_period_start(now), datetime.min.time(), tzinfo=UTC)
    rows = list(
        UsageLog.objects.filter(created_at__gte=month_start, tenant__isnull=False)
        .values("tenant_id")
        .annotate(requests=Count("id"), tokens=Sum("tokens"), errors=Count("id", filter=_ERROR))
        .order_by("-tokens", "-requests", "tenant_id")[:limit]
    )
    tenants = Tenant.objects.in_bulk([row["tenant_id"] for row in rows])
    return [
        TenantMonth(
            tenant=tenants[row["tenant_id"]],
            requests=row["requests"],
            tokens=row["tokens"] or 0,
            errors=row["errors"],
        )
        for row in rows
    ]


@dataclass(frozen=True)
class QuotaUse:
    tenant: Tenant
    period_start: date
    tokens: int
    requests: int
    quota: int

    @property
    def remaining(self) -> int:
        return max(0, self.quota - self.tokens)

    @property
    def fraction(self) -> float:
        """Share of the quota charged, 1.0 or more when it is used up."""
        if self.quota <= 0:
            return 1.0 if self.tokens else 0.0
        return self.tokens / self.quota


def quota_use(*, limit: int = 50, now: datetime | None = None) -> tuple[list[QuotaUse], int]:
    """This month's charged tokens against each tenant's effective quota, fullest first: the
    `limit` fullest, and how many tenants have been charged at all."""
    period_start = current_period_start(now)
    periods = quota_periods(period_start=period_start).select_related("tenant", "tenant__plan")
    uses = [
        QuotaUse(
            tenant=period.tenant,
            period_start=period_start,
            tokens=period.tokens,
            requests=period.requests,
            quota=effective_limits(period.tenant).monthly_token_quota,
        )
        for period in periods
    ]
    uses.sort(key=lambda use: (-use.fraction, -use.tokens, use.tenant.pk))
    return uses[:limit], len(uses)


def tenant_quota_use(*, tenant: Tenant, now: datetime | None = None) -> QuotaUse:
    period_start = current_period_start(now)
    use = period_use(tenant=tenant, period_start=period_start)
    return QuotaUse(
        tenant=tenant,
        period_start=period_start,
        tokens=use.tokens,
        requests=use.requests,
        quota=effective_limits(tenant).monthly_token_quota,
    )


@dataclass(frozen=True)
class Breakdown:
    label: str
    requests: int
    tokens: int
    errors: int


@dataclass(frozen=True)
class ErrorCount:
    status_code: int
    error_type: str
    count: int


@dataclass(frozen=True)
class Breakdowns:
    endpoints: list[Breakdown]
    errors: list[ErrorCount]


def breakdowns(
    *, tenant: Tenant | None = None, days: int = WINDOW_DAYS, now: datetime | None = None
) -> Breakdowns:
    """Requests, tokens and errors per endpoint (busiest first), and failed requests by status
    and error type (commonest first), over the window: one grouped scan serves both."""
    rows = (
        _log_since(since=window_start(days=days, now=now), tenant=tenant)
        .values("endpoint", "status_code", "error_type")
        .annotate(requests=Count("id"), tokens=Sum("tokens"))
        .order_by()
    )
    endpoints: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    errors: dict[tuple[int, str], int] = defaultdict(int)
    for row in rows:
        totals = endpoints[row["endpoint"]]
        totals[0] += row["requests"]
        totals[1] += row["tokens"] or 0
        if row["status_code"] >= 400:
            totals[2] += row["requests"]
            errors[(row["status_code"], row["error_type"])] += row["requests"]
    return Breakdowns(
        endpoints=sorted(
            (
                Breakdown(label=label, requests=requests, tokens=tokens, errors=failed)
                for label, (requests, tokens, failed) in endpoints.items()
            ),
            key=lambda row: (-row.requests, row.label),
        ),
        errors=sorted(
            (
                ErrorCount(status_code=status_code, error_type=error_type, count=count)
                for (status_code, error_type), count in errors.items()
            ),
            key=lambda row: (-row.count, row.status_code, row.error_type),
        ),
    )
