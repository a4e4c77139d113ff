"""Reads: effective limits, tenant lookup and usage summaries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Count, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from accounts.models import ApiKey, Membership, QuotaPeriod, Tenant, UsageLog


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int
    tokens_per_minute: int
    monthly_token_quota: int
    max_texts_per_request: int


def effective_limits(tenant: Tenant) -> Limits:
    """Tenant override, else the plan's value, else the service-wide setting."""
    plan = tenant.plan

    def pick(field: str, fallback: int) -> int:
        for source in (tenant, plan):
            value = getattr(source, field, None) if source is not None else None
            if value is not None:
                return int(value)
        return fallback

    return Limits(
        requests_per_minute=pick("requests_per_minute", settings.RATE_LIMIT_PER_MIN),
        tokens_per_minute=pick("tokens_per_minute", settings.TOKENS_PER_MIN),
        monthly_token_quota=pick("monthly_token_quota", settings.MONTHLY_TOKEN_QUOTA),
        max_texts_per_request=pick("max_texts_per_request", settings.MAX_TEXTS_PER_REQUEST),
    )


def current_period_start(now: datetime | None = None) -> date:
    """Quotas run by calendar month in UTC."""
    now = now or timezone.now()
    return now.astimezone(UTC).date().replace(day=1)


def next_period_start(now: datetime | None = None) -> date:
    start = current_period_start(now)
    return (start + timedelta(days=32)).replace(day=1)


def tenant_id_from(ref: str) -> int | None:
    """The tenant id an operator or an X-Tenant header gives: plain ASCII digits that fit a
    bigint. Anything else names no tenant (and must not reach the database as an out-of-range
    integer)."""
    ref = ref.strip()
    if ref.isascii() and ref.isdigit() and len(ref) <= 18:
        return int(ref)
    return None


def tenants_named(ref: str) -> list[Tenant]:
    """Tenants an operator means by `ref`: the one with that id, or those with that exact name."""
    tenant_id = tenant_id_from(ref)
    if tenant_id is not None:
        by_id = list(Tenant.objects.filter(pk=tenant_id))
        if by_id:
            return by_id
    return list(Tenant.objects.filter(name=ref).order_by("pk"))


def api_key_by_prefix(prefix: str) -> ApiKey | None:
    return ApiKey.objects.select_related("tenant").filter(prefix=prefix).first()


def membership_for(*, user: AbstractBaseUser, tenant_ref: str | None) -> Membership | None:
    """The membership a user's request acts through: the one `X-Tenant` names (by id), or the
    user's default one."""
    memberships = Membership.objects.select_related("tenant", "tenant__plan").filter(user=user)
    if tenant_ref:
        tenant_id = tenant_id_from(tenant_ref)
        return None if tenant_id is None else memberships.filter(tenant_id=tenant_id).first()
    return memberships.order_by("-is_default", "created_at").first()


def supabase_membership(*, subject: str, tenant_ref: str | None) -> Membership | None:
    """The hot path of a Supabase user's request, in one query: the membership it acts through
    (X-Tenant's, else the default one) with the user, the user's identity, the tenant and its
    plan. None when there is no such membership, and the slower path has to find out why (a new
    user, not a member, no default)."""
    memberships = Membership.objects.select_related(
        "user__supabase_identity", "tenant__plan"
    ).filter(user__supabase_identity__subject=subject)
    if tenant_ref:
        tenant_id = tenant_id_from(tenant_ref)
        if tenant_id is None:
            return None
        memberships = memberships.filter(tenant_id=tenant_id)
    else:
        memberships = memberships.filter(is_default=True)
    # At most one row either way (unique constraints). No ORDER BY: with one, the planner may
    # walk the whole membership table in id order looking for this user's row.
    return next(iter(memberships.order_by()[:1]), None)


def tenant_usage_summary(*, tenant: Tenant, days: int = 30) -> dict[str, Any]:
    """What /usage shows a tenant about itself: limits, this period and the last `days` days."""
    limits = effective_limits(tenant)
    period_start = current_period_start()
    period = QuotaPeriod.objects.filter(tenant=tenant, period_start=period_start).first()
    spent = period.tokens if period else 0
    served = period.requests if period else 0
    today = timezone.now().astimezone(UTC).date()
    since = today - timedelta(days=days - 1)
    since_dt = datetime.combine(since, datetime.min.time(), tzinfo=UTC)
    rows = (
        UsageLog.objects.filter(tenant=tenant, created_at__gte=since_dt)
        .annotate(day=TruncDate("created_at", tzinfo=UTC))
        .values("day")
        .annotate(requests=Count("id"), tokens=Sum("tokens"))
        .order_by("day")
    )
    by_day = {row["day"]: row for row in rows}
    daily = [
        {
            "date": day.isoformat(),
            "requests": by_day.get(day, {}).get("requests", 0),
            "tokens": by_day.get(day, {}).get("tokens", 0) or 0,
        }
        for day in (since + timedelta(days=offset) for offset in range(days))
    ]
    return {
        "tenant": {"id": tenant.pk, "name": tenant.name, "is_active": tenant.is_active},
        "plan": {
            "name": tenant.plan.name,
            "requests_per_minute": limits.requests_per_minute,
            "tokens_per_minute": limits.tokens_per_minute,
            "monthly_token_quota": limits.monthly_token_quota,
            "max_texts_per_request": limits.max_texts_per_request,
        },
        "period": {
            "start": period_start.isoformat(),
            "end": next_period_start().isoformat(),
            "requests": served,
            "tokens": spent,
            "remaining_tokens": max(0, limits.monthly_token_quota - spent),
        },
        "daily": daily,
    }
