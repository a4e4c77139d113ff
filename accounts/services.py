"""Business operations on tenants, users and keys (quotas and the usage log: accounts/metering)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.utils import timezone
from rest_framework.exceptions import PermissionDenied

from accounts.credential_cache import remembered
from accounts.models import ApiKey, Membership, Plan, SupabaseIdentity, Tenant
from accounts.selectors import api_key_by_prefix

if TYPE_CHECKING:
    from django.contrib.auth.models import User

UserModel = get_user_model()


@dataclass
class Caller:
    """Who is calling and for which tenant; DRF keeps it in `request.auth`. Authentication
    decides the tenant; when the caller may not act for the tenant it asked for, `refusal` says
    why and the permission check raises it (so the refused request is still logged as the
    caller's)."""

    user: User | None
    api_key: ApiKey | None = None
    tenant: Tenant | None = None
    refusal: PermissionDenied | None = None

    @property
    def user_id(self) -> int | None:
        return self.user.pk if self.user is not None and self.user.is_authenticated else None


# --- Plans and tenants -------------------------------------------------------------------------


DEFAULT_PLAN_NAME = "default"


def get_default_plan() -> Plan:
    """The plan new tenants get. With none marked default (an operator unticked it to move the
    default and has not ticked another yet), the plan named "default" becomes the default again,
    created when there is none.

    Safe under concurrency: get_or_create makes concurrent creators agree on one row, and the
    one-default constraint makes a promotion fail when another plan became the default first;
    either way the default is read again afterwards."""
    plan = Plan.objects.filter(is_default=True).first()
    if plan is not None:
        return plan
    try:
        with transaction.atomic():
            plan, _ = Plan.objects.get_or_create(name=DEFAULT_PLAN_NAME)
            Plan.objects.filter(pk=plan.pk).update(is_default=True)
    except IntegrityError:
        pass  # another plan was made the default meanwhile; it is read below
    return Plan.objects.get(is_default=True)


def create_tenant(*, name: str, owner: User | None = None, plan: Plan | None = None) -> Tenant:
    with transaction.atomic():
        tenant = Tenant.objects.create(name=name, plan=plan or get_default_plan())
        if owner is not None:
            add_member(tenant=tenant, user=owner, role=Membership.Role.OWNER)
    return tenant


def add_member(*, tenant: Tenant, user: User, role: str = Membership.Role.MEMBER) -> Membership:
    """Adds `user` to `tenant`; the first tenant a user joins becomes their default."""
    with transaction.atomic():
        membership, _ = Membership.objects.get_or_create(
            user=user, tenant=tenant, defaults={"role": role}
        )
        if not Membership.objects.filter(user=user, is_default=True).exists():
            Membership.objects.filter(pk=membership.pk).update(is_default=True)
            membership.is_default = True
    return membership


def ensure_personal_tenant(*, user: User) -> Tenant:
    """The user's own tenant, created on first need (and their membership of it). Safe under
    concurrent first requests: the unique `personal_owner` makes one insert win, and the losers
    read the winner's row."""
    tenant = Tenant.objects.filter(personal_owner=user).first()
    if tenant is None:
        label = getattr(user, "email", "") or user.get_username()
        try:
            with transaction.atomic():
                tenant = Tenant.objects.create(
                    name=f"{label} (personal)"[:200], plan=get_default_plan(), personal_owner=user
                )
        except IntegrityError:
            tenant = Tenant.objects.get(personal_owner=user)
    try:
        with transaction.atomic():
            add_member(tenant=tenant, user=user, role=Membership.Role.OWNER)
    except IntegrityError:
        pass  # a concurrent request added the membership first
    return tenant


def supabase_username(subject: str) -> str:
    """A unique username for a Supabase subject (a UUID in practice; any string up to 255)."""
    username = f"supabase:{subject}"
    if len(username) > 150:
        username = f"supabase:sha256:{hashlib.sha256(subject.encode()).hexdigest()}"
    return username


def _create_supabase_user(*, subject: str, email: str) -> User:
    for _ in range(2):
        try:
            with transaction.atomic():
                user = UserModel.objects.create(username=supabase_username(subject), email=email)
                user.set_unusable_password()
                user.save(update_fields=["password"])
                SupabaseIdentity.objects.create(user=user, subject=subject, email=email)
                ensure_personal_tenant(user=user)
                return user
        except IntegrityError:
            # A concurrent first request won; its rows are committed by now. (Should it have
            # rolled back instead, there is nothing to read, and this one tries again.)
            identity = (
                SupabaseIdentity.objects.select_related("user").filter(subject=subject).first()
            )
            if identity is not None:
                return identity.user
    raise IntegrityError(f"could not provision the Supabase user {subject!r}")


# How stale `SupabaseIdentity.last_seen_at` and `ApiKey.last_used_at` may get: one write a
# minute per active user or key at most.
LAST_SEEN_PRECISION_SECONDS = 60


def _stale(seen_at: datetime | None, now: datetime) -> bool:
    return seen_at is None or (now - seen_at).total_seconds() >= LAST_SEEN_PRECISION_SECONDS


def provision_supabase_user(*, subject: str, email: str) -> User:
    """The local user for a Supabase `sub`; on its first token, a new user with a personal tenant.

    One indexed SELECT (identity joined with its user) for a known subject. A new subject's user,
    identity, personal tenant and membership are created in one transaction, so concurrent first
    requests make exactly one of each: the unique username and subject make every other insert
    fail, and the losers read the winner's committed rows. The e-mail follows the token's."""
    identity = SupabaseIdentity.objects.select_related("user").filter(subject=subject).first()
    if identity is None:
        return _create_supabase_user(subject=subject, email=email)
    note_sign_in(identity=identity, email=email)
    return identity.user


def note_sign_in(*, identity: SupabaseIdentity, email: str) -> None:
    """Keeps the e-mail in step with the token's, and `last_seen_at` to the minute; writes only
    when one of them changed, so a known user's request costs no write."""
    user = identity.user
    now = timezone.now()
    changes: dict[str, object] = {}
    if email and identity.email != email:
        changes["email"] = identity.email = email
        UserModel.objects.filter(pk=user.pk).update(email=email)
        user.email = email
    if _stale(identity.last_seen_at, now):
        changes["last_seen_at"] = identity.last_seen_at = now
    if changes:
        SupabaseIdentity.objects.filter(pk=identity.pk).update(**changes)


# --- API keys ----------------------------------------------------------------------------------


_API_KEY_ID_LENGTH = 12
_API_KEY_SECRET_BYTES = 32
_API_KEY_BODY = re.compile(r"[0-9a-f]{12}_[A-Za-z0-9_-]{43}")


def hash_api_key(raw_key: str) -> str:
    # Keys carry 256 bits of randomness, so a fast hash is enough; a slow one would only cost
    # latency on every request.
    return hashlib.sha256(raw_key.encode()).hexdigest()


def create_api_key(
    *,
    tenant: Tenant,
    name: str,
    created_by: User | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Returns the key row and the full secret, which is never stored and never shown again."""
    prefix = f"{settings.API_KEY_PREFIX}_{secrets.token_hex(_API_KEY_ID_LENGTH // 2)}"
    raw_key = f"{prefix}_{secrets.token_urlsafe(_API_KEY_SECRET_BYTES)}"
    api_key = ApiKey.objects.create(
        tenant=tenant,
        name=name,
        prefix=prefix,
        hashed_key=hash_api_key(raw_key),
        created_by=created_by if created_by is not None and created_by.pk else None,
        expires_at=expires_at,
    )
    return api_key, raw_key


def looks_like_api_key(raw: str) -> bool:
    """Whether a bearer credential is meant as one of our API keys (JWTs start with `eyJ`)."""
    return raw.startswith(f"{settings.API_KEY_PREFIX}_")


def is_well_formed_api_key(raw: str) -> bool:
    """`<API_KEY_PREFIX>_<12 hex>_<43 base64url>`, as create_api_key makes them."""
    head, separator, rest = raw.partition(f"{settings.API_KEY_PREFIX}_")
    return not head and bool(separator) and _API_KEY_BODY.fullmatch(rest) is not None


def api_key_prefix(raw: str) -> str:
    """A key's public prefix (`<API_KEY_PREFIX>_<12 hex>`, as the admin shows it), given the
    whole key or the prefix itself."""
    return raw[: len(settings.API_KEY_PREFIX) + 1 + _API_KEY_ID_LENGTH]


def find_api_key(*, raw_key: str) -> ApiKey | None:
    """The key row for a presented secret, or None; the public prefix finds the row (a unique
    index), and the hashes are compared in constant time."""
    prefix = api_key_prefix(raw_key)
    api_key = remembered(("api-key", prefix), lambda: api_key_by_prefix(prefix))
    if api_key is None or not hmac.compare_digest(api_key.hashed_key, hash_api_key(raw_key)):
        return None
    return api_key


def touch_api_key(*, api_key: ApiKey) -> None:
    """Keeps `last_used_at` at minute precision, so a busy key costs one write a minute."""
    now = timezone.now()
    if _stale(api_key.last_used_at, now):
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        api_key.last_used_at = now


def revoke_api_key(*, api_key: ApiKey) -> ApiKey:
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key
