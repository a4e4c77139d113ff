"""Quota periods and the read-only usage log, with its filters and a paginator that estimates
the count of a big unfiltered log."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from django.contrib import admin
from django.core.paginator import Paginator
from django.db import connection
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils.functional import cached_property

from accounts.admin.common import ReadOnlyAdmin
from accounts.models import QuotaPeriod, UsageLog
from accounts.selectors import effective_limits


@admin.register(QuotaPeriod)
class QuotaPeriodAdmin(ReadOnlyAdmin):
    """What each tenant was charged per month; it always equals the sum of its usage log, so it
    is never edited by hand (raise the tenant's quota instead)."""

    list_display = ("tenant", "period_start", "tokens", "requests", "quota", "used")
    list_filter = ("period_start",)
    list_select_related = ("tenant", "tenant__plan")
    search_fields = ("tenant__name",)
    ordering = ("-period_start", "-tokens")

    @admin.display(description="Quota")
    def quota(self, period: QuotaPeriod) -> int:
        return effective_limits(period.tenant).monthly_token_quota

    @admin.display(description="Used")
    def used(self, period: QuotaPeriod) -> str:
        quota = effective_limits(period.tenant).monthly_token_quota
        return f"{period.tokens / quota:.1%}" if quota else "—"


class EndpointFilter(admin.SimpleListFilter):
    """The endpoints come from the metered views themselves: a DISTINCT over the whole log would
    cost a full scan on every page view."""

    title = "endpoint"
    parameter_name = "endpoint"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        from embeddings.views import MeteredEmbedView  # the serving side, loaded on demand

        endpoints: set[str] = set()
        pending = list(MeteredEmbedView.__subclasses__())
        while pending:
            view = pending.pop()
            pending.extend(view.__subclasses__())
            if view.endpoint:
                endpoints.add(view.endpoint)
        return [(endpoint, endpoint) for endpoint in sorted(endpoints)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[UsageLog]) -> QuerySet[UsageLog]:
        return queryset.filter(endpoint=self.value()) if self.value() else queryset


class StatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"
    _classes = {
        "served": ("Served (2xx)", Q(status_code__lt=400)),
        "client_error": ("Refused (4xx)", Q(status_code__gte=400, status_code__lt=500)),
        "rate_limited": ("Rate limit or quota (429)", Q(status_code=429)),
        "server_error": ("Failed (5xx)", Q(status_code__gte=500)),
    }

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(key, label) for key, (label, _) in self._classes.items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[UsageLog]) -> QuerySet[UsageLog]:
        chosen = self._classes.get(self.value() or "")
        return queryset.filter(chosen[1]) if chosen else queryset


class UsageLogPaginator(Paginator):
    """The exact count, except for the unfiltered log of a big PostgreSQL table, where counting
    every row on each page view costs seconds: there the planner's estimate (kept fresh by
    autovacuum) is close enough to number the pages. At worst the last page comes out empty,
    or the oldest rows are reached through a date filter rather than a page number."""

    estimate_above = 1_000_000

    @cached_property
    def count(self) -> int:
        query = getattr(self.object_list, "query", None)
        if connection.vendor == "postgresql" and query is not None and not query.where:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                    [UsageLog._meta.db_table],
                )
                row = cursor.fetchone()
            estimate = int(row[0]) if row else -1
            if estimate > self.estimate_above:
                return estimate
        return super().count


@admin.register(UsageLog)
class UsageLogAdmin(ReadOnlyAdmin):
    list_display = (
        "time",
        "request_id",
        "tenant",
        "endpoint",
        "status",
        "tokens",
        "latency",
        "caller",
    )
    list_filter = ("tenant", EndpointFilter, StatusFilter, "created_at")
    list_select_related = ("tenant", "user", "api_key")
    search_fields = ("request_id",)
    search_help_text = "Exact request id (the x-request-id header of the response)."
    date_hierarchy = "created_at"
    ordering = ("-created_at", "-id")
    paginator = UsageLogPaginator
    # The second, unfiltered count Django shows next to a filtered one is a full scan, and so
    # would be the facet counts (one per choice of every filter).
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    list_per_page = 100

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[UsageLog], search_term: str
    ) -> tuple[QuerySet[UsageLog], bool]:
        # An exact, case-sensitive match, which the request_id index serves (the admin's own
        # search would be a case-insensitive scan of the whole log).
        term = search_term.strip()
        return (queryset.filter(request_id=term) if term else queryset), False

    @admin.display(description="Time (UTC)", ordering="created_at")
    def time(self, log: UsageLog) -> str:
        return log.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")

    @admin.display(description="Status", ordering="status_code")
    def status(self, log: UsageLog) -> str:
        return f"{log.status_code} {log.error_type}".strip()

    @admin.display(description="Latency", ordering="latency_ms")
    def latency(self, log: UsageLog) -> str:
        return f"{log.latency_ms:,.1f} ms"

    @admin.display(description="Caller")
    def caller(self, log: UsageLog) -> str:
        if log.api_key_id is not None and log.api_key is not None:
            return f"key {log.api_key.prefix}"
        if log.user_id is not None and log.user is not None:
            return str(log.user)
        return "—"
