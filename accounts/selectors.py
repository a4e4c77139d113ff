"""Reads: effective limits, tenant lookup and usage summaries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db.models import QuerySet
from django.utils import timezone

from accounts.credential_cache import remembered
from accounts.models import ApiKey, Membership, QuotaPeriod, Tenant

if TYPE_CHECKING:
    from django.contrib.auth.models import User


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int
    tokens_per_minute: int
    monthly_token_quota: int
    max_texts_per_request: int
    # /v1/embeddings: OpenAI's ceiling, lowered by a plan's or tenant's own max_texts_per_request.
    max_openai_inputs_per_request: int
    # Texts this tenant may have waiting for the model in one worker; None: the batcher's share.
    max_texts_in_flight: int | None = None


def effective_limits(tenant: Tenant) -> Limits:
    """Tenant override, else the plan's value, else the service-wide setting. The texts per
    request are capped at MAX_TEXTS_PER_REQUEST whatever a plan or tenant says: that setting
    bounds what one request may make a worker hold and encode."""
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
        max_texts_per_request=min(
            pick("max_texts_per_request", settings.MAX_TEXTS_PER_REQUEST),
            settings.MAX_TEXTS_PER_REQUEST,
        ),
        max_openai_inputs_per_request=min(
            pick("max_texts_per_request", settings.OPENAI_MAX_INPUTS_PER_REQUEST),
            settings.OPENAI_MAX_INPUTS_PER_REQUEST,
        ),
        max_texts_in_flight=next(
            (
                int(value)
                for source in (tenant, plan)
                if (value := getattr(source, "max_texts_in_flight", None)) is not None
            ),
            None,
        ),
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
    """The key with this public prefix, with its tenant and plan (what a request needs)."""
    return ApiKey.objects.select_related("tenant__plan").filter(prefix=prefix).first()


def membership_for(*, user: User, tenant_ref: str | None) -> Membership | None:
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

    def load() -> Membership | None:
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
        # At most one row either way (unique constraints). No ORDER BY: with one, the planner
        # may walk the whole membership table in id order looking for this user's row.
        return next(iter(memberships.order_by()[:1]), None)

    return remembered(("membership", subject, tenant_ref or ""), load)


@dataclass(frozen=True)
class PeriodUse:
    """What a tenant has been charged in one quota period."""

    tokens: int = 0
    requests: int = 0


def quota_periods(*, period_start: date) -> QuerySet[QuotaPeriod]:
    """Every charged tenant's row of the period, for lists of many tenants. The quota charge
    keeps these rows, so they, not the usage log, say what a tenant has spent; a tenant without
    one has been charged nothing."""
    return QuotaPeriod.objects.filter(period_start=period_start)


def period_use(*, tenant: Tenant, period_start: date) -> PeriodUse:
    """What `tenant` has been charged in the period that starts on `period_start`."""
    rows = quota_periods(period_start=period_start).filter(tenant=tenant)
    # At most one row (unique per tenant and period); no ORDER BY for the planner to honour.
    row = next(iter(rows.values_list("tokens", "requests").order_by()[:1]), None)
    return PeriodUse() if row is None else PeriodUse(tokens=row[0], requests=row[1])


@dataclass(frozen=True)
class UsageSummary:
    """What /usage shows a tenant about itself (accounts.serializers.UsageSummarySerializer)."""

    tenant: Tenant
    limits: Limits
    period_start: date
    period_end: date
    use: PeriodUse
    daily: list[Any]  # dashboard_selectors.DailyUsage, oldest first

    @property
    def remaining_tokens(self) -> int:
        return max(0, self.limits.monthly_token_quota - self.use.tokens)


def tenant_usage_summary(*, tenant: Tenant, days: int = 30) -> UsageSummary:
    """What /usage shows a tenant about itself: limits, this period and the last `days` days."""
    # Imported here because dashboard_selectors builds on this module.
    from accounts.dashboard_selectors import usage_window

    period_start = current_period_start()
    return UsageSummary(
        tenant=tenant,
        limits=effective_limits(tenant),
        period_start=period_start,
        period_end=next_period_start(),
        use=period_use(tenant=tenant, period_start=period_start),
        daily=usage_window(tenant=tenant, days=days).days,
    )
