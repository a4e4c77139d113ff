"""Which tenant a request acts for, and whether it may act at all."""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions, permissions
from rest_framework.request import Request

from accounts import services
from accounts.selectors import membership_for
from accounts.services import Caller

TENANT_HEADER = "HTTP_X_TENANT"


def resolve_tenant(request: Request) -> Caller:
    """Fills in `request.auth.tenant`: an API key's own tenant; for a user, the tenant named by
    `X-Tenant` (by id) when the user is a member of it, else the user's default tenant."""
    caller = request.auth
    if not isinstance(caller, Caller):
        raise exceptions.NotAuthenticated()
    if caller.tenant is not None:
        requested = request.META.get(TENANT_HEADER)
        if requested and requested != str(caller.tenant.pk):
            raise exceptions.PermissionDenied(
                "An API key acts only for its own tenant.", code="tenant_mismatch"
            )
        return caller
    requested = request.META.get(TENANT_HEADER) or None
    membership = membership_for(user=caller.user, tenant_ref=requested)
    if membership is None:
        if requested:
            raise exceptions.PermissionDenied(
                f"You are not a member of tenant {requested!r}.", code="not_a_member"
            )
        caller.tenant = services.ensure_personal_tenant(user=caller.user)
    else:
        caller.tenant = membership.tenant
    return caller


class HasActiveTenant(permissions.BasePermission):
    message = "This tenant is inactive."

    def has_permission(self, request: Request, view: Any) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        caller = resolve_tenant(request)
        if caller.tenant is None or not caller.tenant.is_active:
            raise exceptions.PermissionDenied(self.message, code="tenant_inactive")
        return True
