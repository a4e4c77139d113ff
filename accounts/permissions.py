"""Which tenant a request acts for, and whether it may act at all."""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions, permissions
from rest_framework.request import Request

from accounts import services
from accounts.selectors import membership_for, tenant_id_from
from accounts.services import Caller

TENANT_HEADER = "HTTP_X_TENANT"


def requested_tenant(request: Request) -> str | None:
    """What the X-Tenant header asks for, if anything."""
    return request.META.get(TENANT_HEADER, "").strip() or None


def resolve_tenant(request: Request) -> Caller:
    """Fills in `request.auth.tenant`: an API key's own tenant; for a user, the tenant named by
    `X-Tenant` (its id) when the user is a member of it, else the user's default tenant.

    Raises PermissionDenied (403) for an X-Tenant the caller may not act for."""
    caller = request.auth
    if not isinstance(caller, Caller):
        raise exceptions.NotAuthenticated()
    requested = requested_tenant(request)
    if caller.api_key is not None:
        # Read as a user's X-Tenant is ("007" is tenant 7), so both kinds of caller agree.
        if requested and tenant_id_from(requested) != caller.api_key.tenant_id:
            raise exceptions.PermissionDenied(
                "An API key acts only for its own tenant; drop the X-Tenant header or send its "
                "tenant's id.",
                code="tenant_mismatch",
            )
        return caller
    if caller.tenant is not None:
        return caller  # resolved already, by the permission check
    user = caller.user
    assert user is not None, "authentication gives every caller without an API key its user"
    membership = membership_for(user=user, tenant_ref=requested)
    if membership is not None:
        caller.tenant = membership.tenant
    elif requested:
        raise exceptions.PermissionDenied(
            f"You are not a member of tenant {requested[:40]!r} (X-Tenant takes the id of a "
            "tenant you belong to).",
            code="not_a_member",
        )
    else:
        # A user with no membership at all (an admin removed it): a personal tenant again.
        caller.tenant = services.ensure_personal_tenant(user=user)
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
