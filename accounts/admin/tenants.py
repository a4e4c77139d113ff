"""Plans, tenants with their members and keys, memberships and Supabase identities."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from accounts.admin.common import LIMIT_FIELDS, ReadOnlyAdmin, usage_link
from accounts.models import ApiKey, Membership, Plan, SupabaseIdentity, Tenant
from accounts.selectors import current_period_start, effective_limits, quota_periods


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = ("name", "is_default", *LIMIT_FIELDS, "tenant_count")
    list_filter = ("is_default",)
    search_fields = ("name",)
    fieldsets = (
        (None, {"fields": ("name", "is_default")}),
        (
            "Limits",
            {
                "fields": LIMIT_FIELDS,
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
                "fields": (*LIMIT_FIELDS, "effective_limits"),
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
        return usage_link(tenant.pk)

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
