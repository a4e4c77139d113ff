"""The operators' admin: tenants with their members and keys, plans, API keys, quota periods and
the read-only usage log. The usage dashboard lives in accounts.dashboard."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from django.contrib import admin, messages
from django.core.paginator import Paginator
from django.db import connection
from django.db.models import Count, OuterRef, Q, QuerySet, Subquery
from django.forms import ModelForm
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.functional import cached_property
from django.utils.html import format_html

from accounts import services
from accounts.models import (
    ApiKey,
    Membership,
    Plan,
    QuotaPeriod,
    SupabaseIdentity,
    Tenant,
    UsageLog,
)
from accounts.selectors import current_period_start, effective_limits, quota_periods

admin.site.site_header = "embedplatform administration"
admin.site.site_title = "embedplatform admin"
admin.site.index_title = "Operations"
# "/" is no page of this service (it serves APIs), so no "View site" link.
admin.site.site_url = None

_LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "monthly_token_quota",
    "max_texts_per_request",
    "max_texts_in_flight",
)


def _usage_link(tenant_id: int, label: str = "Usage") -> str:
    return format_html('<a href="{}">{}</a>', reverse("usage:tenant", args=[tenant_id]), label)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records of what happened: everybody may look, nobody may add, edit or delete."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# --- Plans -------------------------------------------------------------------------------------


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = ("name", "is_default", *_LIMIT_FIELDS, "tenant_count")
    list_filter = ("is_default",)
    search_fields = ("name",)
    fieldsets = (
        (None, {"fields": ("name", "is_default")}),
        (
            "Limits",
            {
                "fields": _LIMIT_FIELDS,
                "description": "Empty means the service-wide default from the environment "
                "(RATE_LIMIT_PER_MIN, TOKENS_PER_MIN, MONTHLY_TOKEN_QUOTA, MAX_TEXTS_PER_REQUEST); "
                "MAX_TEXTS_PER_REQUEST is also the most texts per request any plan can allow.",
            },
        ),
    )
    empty_value_display = "service default"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Plan]:
        plans: QuerySet[Plan] = (
            super().get_queryset(request).annotate(tenant_total=Count("tenants"))
        )
        return plans

    @admin.display(description="Tenants", ordering="tenant_total")
    def tenant_count(self, plan: Plan) -> int:
        return int(getattr(plan, "tenant_total", 0))


# --- Tenants -----------------------------------------------------------------------------------


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    fields = ("user", "role", "is_default", "created_at")
    readonly_fields = ("created_at",)
    raw_id_fields = ("user",)


class ApiKeyInline(admin.TabularInline):
    """The tenant's keys at a glance. Keys are created on the API key page, where the secret is
    shown once; an inline form could not show it."""

    model = ApiKey
    extra = 0
    can_delete = False
    show_change_link = True
    fields = ("name", "prefix", "created_at", "expires_at", "revoked_at", "last_used_at")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "plan",
        "is_active",
        "tokens_this_month",
        "monthly_quota",
        "created_at",
        "usage",
    )
    list_filter = ("is_active", "plan")
    list_select_related = ("plan",)
    search_fields = ("name",)
    raw_id_fields = ("personal_owner",)
    readonly_fields = ("created_at", "effective_limits", "new_api_key")
    inlines = (MembershipInline, ApiKeyInline)
    actions = ("activate", "deactivate")
    fieldsets = (
        (None, {"fields": ("name", "plan", "is_active", "personal_owner", "created_at")}),
        (
            "Overrides of the plan's limits",
            {
                "fields": (*_LIMIT_FIELDS, "effective_limits"),
                "description": "Empty means as the plan says.",
            },
        ),
        ("API keys", {"fields": ("new_api_key",)}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Tenant]:
        charged = (
            quota_periods(period_start=current_period_start())
            .filter(tenant=OuterRef("pk"))
            .values("tokens")
        )
        tenants: QuerySet[Tenant] = (
            super().get_queryset(request).annotate(month_tokens=Subquery(charged))
        )
        return tenants

    @admin.display(description="Tokens this month", ordering="month_tokens")
    def tokens_this_month(self, tenant: Tenant) -> int:
        return int(getattr(tenant, "month_tokens", None) or 0)

    @admin.display(description="Monthly quota")
    def monthly_quota(self, tenant: Tenant) -> int:
        return effective_limits(tenant).monthly_token_quota

    @admin.display(description="Usage")
    def usage(self, tenant: Tenant) -> str:
        return _usage_link(tenant.pk)

    @admin.display(description="Effective limits")
    def effective_limits(self, tenant: Tenant) -> str:
        if tenant.pk is None:
            return "Shown once the tenant is saved."
        limits = effective_limits(tenant)
        return format_html(
            "{} requests/min, {} tokens/min, {} tokens/month, {} texts/request",
            f"{limits.requests_per_minute:,}",
            f"{limits.tokens_per_minute:,}",
            f"{limits.monthly_token_quota:,}",
            f"{limits.max_texts_per_request:,}",
        )

    @admin.display(description="New key")
    def new_api_key(self, tenant: Tenant) -> str:
        if tenant.pk is None:
            return "Keys can be created once the tenant is saved."
        url = reverse("admin:accounts_apikey_add") + f"?tenant={tenant.pk}"
        return format_html(
            '<a href="{}">Create an API key for this tenant</a> (its secret is shown once)', url
        )

    @admin.action(description="Activate selected tenants")
    def activate(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        changed = queryset.update(is_active=True)
        self.message_user(request, f"{changed} tenant(s) activated.", messages.SUCCESS)

    @admin.action(description="Deactivate selected tenants (their requests are refused)")
    def deactivate(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        changed = queryset.update(is_active=False)
        self.message_user(request, f"{changed} tenant(s) deactivated.", messages.SUCCESS)


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("user", "tenant", "role", "is_default", "created_at")
    list_filter = ("role", "is_default")
    list_select_related = ("user", "tenant")
    search_fields = ("user__username", "user__email", "tenant__name")
    raw_id_fields = ("user", "tenant")


@admin.register(SupabaseIdentity)
class SupabaseIdentityAdmin(ReadOnlyAdmin):
    """Links made just in time from verified Supabase tokens, never by hand."""

    list_display = ("email", "subject", "user", "last_seen_at")
    list_select_related = ("user",)
    search_fields = ("email", "subject", "user__username")


# --- API keys ----------------------------------------------------------------------------------


class KeyStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "Active"), ("expired", "Expired"), ("revoked", "Revoked")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> QuerySet[ApiKey]:
        now = timezone.now()
        unexpired = Q(expires_at__isnull=True) | Q(expires_at__gt=now)
        if self.value() == "active":
            return queryset.filter(unexpired, revoked_at__isnull=True)
        if self.value() == "expired":
            return queryset.filter(expires_at__lte=now, revoked_at__isnull=True)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


class ApiKeyAddForm(ModelForm):
    class Meta:
        model = ApiKey
        fields = ("tenant", "name", "expires_at")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are made by services.create_api_key; the full secret appears once, on the page that
    answers the add form, and is neither stored nor sent again. The hash is never shown."""

    list_display = (
        "name",
        "tenant",
        "prefix",
        "state",
        "created_at",
        "expires_at",
        "last_used_at",
    )
    list_filter = (KeyStateFilter, "tenant")
    list_select_related = ("tenant",)
    search_fields = ("name", "prefix", "tenant__name")
    raw_id_fields = ("tenant",)
    actions = ("revoke",)
    created_template = "admin/accounts/apikey/created.html"

    def add_view(
        self, request: HttpRequest, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        # Whichever button, the answer is the page with the secret; offer only the one.
        extra_context = {
            **(extra_context or {}),
            "show_save_and_add_another": False,
            "show_save_and_continue": False,
        }
        return super().add_view(request, form_url, extra_context)

    def get_form(
        self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any
    ) -> Any:
        if obj is None:
            kwargs["form"] = ApiKeyAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        if obj is None:
            return ("tenant", "name", "expires_at")
        return (
            "tenant",
            "name",
            "prefix",
            "expires_at",
            "revoked_at",
            "created_by",
            "created_at",
            "last_used_at",
        )

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        if obj is None:
            return []
        # A key stays with its tenant, and is revoked with the action, never un-revoked.
        return ["tenant", "prefix", "revoked_at", "created_by", "created_at", "last_used_at"]

    @admin.display(description="State")
    def state(self, api_key: ApiKey) -> str:
        if api_key.is_revoked:
            return "revoked"
        if api_key.is_expired():
            return "expired"
        return "active"

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        created, secret = services.create_api_key(
            tenant=obj.tenant,
            name=obj.name,
            # The admin site lets only staff users in, never AnonymousUser.
            created_by=request.user,  # type: ignore[arg-type]
            expires_at=obj.expires_at,
        )
        # The admin goes on with `obj` (history entry, response): make it the row just created.
        for field in ApiKey._meta.concrete_fields:
            setattr(obj, field.attname, getattr(created, field.attname))
        obj._state.adding = False
        obj._state.db = created._state.db
        # Handed to response_add on the instance itself: it lives as long as this request.
        obj._new_secret = secret  # type: ignore[attr-defined]  # not a model field, on purpose

    def response_add(
        self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None
    ) -> HttpResponse:
        secret = getattr(obj, "_new_secret", None)
        if secret is None:
            return super().response_add(request, obj, post_url_continue)
        # The secret goes out in this response only: not through a redirect and the messages
        # framework, which would keep it in a cookie or the session until shown.
        response = TemplateResponse(
            request,
            self.created_template,
            {
                **self.admin_site.each_context(request),
                "title": "API key created",
                "opts": self.opts,
                "api_key": obj,
                "secret": secret,
                "change_url": reverse("admin:accounts_apikey_change", args=[obj.pk]),
                "tenant_url": reverse("admin:accounts_tenant_change", args=[obj.tenant_id]),
            },
        )
        add_never_cache_headers(response)
        return response

    @admin.action(description="Revoke selected API keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = 0
        for api_key in queryset.filter(revoked_at__isnull=True):
            services.revoke_api_key(api_key=api_key)
            revoked += 1
        self.message_user(request, f"{revoked} API key(s) revoked.", messages.SUCCESS)


# --- Quota and usage ---------------------------------------------------------------------------


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
