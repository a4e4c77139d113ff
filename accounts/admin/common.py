"""What the admin pages share: the limit fields, the usage link, read-only records."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "monthly_token_quota",
    "max_texts_per_request",
    "max_texts_in_flight",
)


def usage_link(tenant_id: int, label: str = "Usage") -> str:
    return format_html('<a href="{}">{}</a>', reverse("usage:tenant", args=[tenant_id]), label)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records of what happened: everybody may look, nobody may add, edit or delete."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
