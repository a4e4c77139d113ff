"""Whether a request may act at all: pure checks of what authentication decided."""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions, permissions
from rest_framework.request import Request

from accounts.services import Caller


def resolve_tenant(request: Request) -> Caller:
    """The caller, with the tenant authentication decided for it (`authentication.with_tenant`).

    Raises NotAuthenticated (401) without a caller, and PermissionDenied (403) for an X-Tenant
    the caller may not act for."""
    caller = request.auth
    if not isinstance(caller, Caller):
        raise exceptions.NotAuthenticated()
    if caller.refusal is not None:
        raise caller.refusal
    return caller


class HasActiveTenant(permissions.BasePermission):
    message = "This tenant is inactive."

    def has_permission(self, request: Request, view: Any) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        caller = resolve_tenant(request)
        if caller.tenant is None or not caller.tenant.is_active:
            raise exceptions.PermissionDenied(
                "This tenant is inactive; ask its owner or the operators to reactivate it.",
                code="tenant_inactive",
            )
        return True
