"""API keys: listed by state, created with the raw key shown once, revoked in bulk."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import Q, QuerySet
from django.forms import ModelForm
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers

from accounts import services
from accounts.models import ApiKey


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
