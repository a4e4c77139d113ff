"""Business operations on tenants, users, keys, quotas and the usage log."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, replace
from datetime import date, datetime

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from accounts.credential_cache import remembered
from accounts.models import (
    ApiKey,
    Membership,
    Plan,
    QuotaPeriod,
    SupabaseIdentity,
    Tenant,
    UsageLog,
)
from accounts.selectors import (
    api_key_by_prefix,
    current_period_start,
    effective_limits,
    period_use,
)
from embedplatform.errors import QuotaExceeded

User = get_user_model()


@dataclass
class Caller:
    """Who is calling and for which tenant; DRF keeps it in `request.auth`."""

    user: AbstractBaseUser | None
    api_key: ApiKey | None = None
    tenant: Tenant | None = None

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


def create_tenant(
    *, name: str, owner: AbstractBaseUser | None = None, plan: Plan | None = None
) -> Tenant:
    with transaction.atomic():
        tenant = Tenant.objects.create(name=name, plan=plan or get_default_plan())
        if owner is not None:
            add_member(tenant=tenant, user=owner, role=Membership.Role.OWNER)
    return tenant


def add_member(
    *, tenant: Tenant, user: AbstractBaseUser, role: str = Membership.Role.MEMBER
) -> Membership:
    """Adds `user` to `tenant`; the first tenant a user joins becomes their default."""
    with transaction.atomic():
        membership, _ = Membership.objects.get_or_create(
            user=user, tenant=tenant, defaults={"role": role}
        )
        if not Membership.objects.filter(user=user, is_default=True).exists():
            Membership.objects.filter(pk=membership.pk).update(is_default=True)
            membership.is_default = True
    return membership


def ensure_personal_tenant(*, user: AbstractBaseUser) -> Tenant:
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


def _create_supabase_user(*, subject: str, email: str) -> AbstractBaseUser:
    for _ in range(2):
        try:
            with transaction.atomic():
                user = User.objects.create(username=supabase_username(subject), email=email)
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


def provision_supabase_user(*, subject: str, email: str) -> AbstractBaseUser:
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
        User.objects.filter(pk=user.pk).update(email=email)
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
    created_by: AbstractBaseUser | None = None,
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


# --- Quota and usage ---------------------------------------------------------------------------


# What this process last saw charged to each tenant: (month, tokens, when). The pre-check may
# trust it for QUOTA_PRECHECK_CACHE_SECONDS while the tenant is far from its quota (other
# workers may have charged meanwhile, hence the headroom); near the quota it asks the database.
# Nothing can overspend either way: the charge itself is the atomic check.
_seen_spent: dict[int, tuple[date, int, float]] = {}
_PRECHECK_HEADROOM = 0.1


def _saw_spent(*, tenant_id: int, period_start: date, tokens: int) -> None:
    _seen_spent[tenant_id] = (period_start, tokens, time.monotonic())


def check_quota(*, tenant: Tenant, tokens: int) -> None:
    """Refuses, before the model runs, a request that cannot fit in this month's quota. The
    authoritative check happens again when charging, atomically."""
    quota = effective_limits(tenant).monthly_token_quota
    period_start = current_period_start()
    seen = _seen_spent.get(tenant.pk)
    if (
        seen is not None
        and seen[0] == period_start
        and time.monotonic() - seen[2] < settings.QUOTA_PRECHECK_CACHE_SECONDS
        and seen[1] + tokens <= quota * (1 - _PRECHECK_HEADROOM)
    ):
        return
    spent = period_use(tenant=tenant, period_start=period_start).tokens
    _saw_spent(tenant_id=tenant.pk, period_start=period_start, tokens=spent)
    if spent + tokens > quota:
        raise _quota_exceeded(quota=quota, spent=spent, tokens=tokens)


def _quota_exceeded(*, quota: int, spent: int, tokens: int) -> QuotaExceeded:
    remaining = max(0, quota - spent)
    return QuotaExceeded(
        f"This request needs {tokens} tokens but only {remaining} of the tenant's monthly quota "
        f"of {quota} remain.",
        code="insufficient_quota",
    )


@dataclass(frozen=True)
class UsageRecord:
    caller: Caller
    endpoint: str
    model: str
    inputs: int
    tokens: int
    status_code: int
    latency_ms: float
    request_id: str
    error_type: str = ""


def _log(record: UsageRecord) -> UsageLog:
    return UsageLog.objects.create(
        tenant=record.caller.tenant,
        user_id=record.caller.user_id,
        api_key=record.caller.api_key,
        endpoint=record.endpoint,
        model=record.model,
        inputs=record.inputs,
        tokens=record.tokens,
        status_code=record.status_code,
        error_type=record.error_type,
        latency_ms=record.latency_ms,
        request_id=record.request_id,
    )


# The common case on PostgreSQL in one statement, so one round trip: the conditional charge, and
# the usage row only if the charge happened. A statement is atomic on its own.
_CHARGE_AND_LOG_SQL = f"""
WITH charged AS (
    UPDATE {QuotaPeriod._meta.db_table}
       SET tokens = tokens + %(tokens)s, requests = requests + 1
     WHERE tenant_id = %(tenant_id)s AND period_start = %(period_start)s AND tokens <= %(room)s
 RETURNING tokens
), logged AS (
    INSERT INTO {UsageLog._meta.db_table}
           (tenant_id, user_id, api_key_id, endpoint, model, inputs, tokens, status_code,
            error_type, latency_ms, request_id, created_at)
    SELECT %(tenant_id)s, %(user_id)s, %(api_key_id)s, %(endpoint)s, %(model)s, %(inputs)s,
           %(tokens)s, %(status_code)s, %(error_type)s, %(latency_ms)s, %(request_id)s,
           %(created_at)s
      FROM charged
    RETURNING id
)
SELECT charged.tokens FROM charged, logged
"""


def _charge_and_log_in_one_statement(
    *, record: UsageRecord, period_start: date, quota: int
) -> bool:
    tenant = record.caller.tenant
    assert tenant is not None
    params = {
        "tokens": record.tokens,
        "tenant_id": tenant.pk,
        "period_start": period_start,
        "room": quota - record.tokens,
        "user_id": record.caller.user_id,
        "api_key_id": record.caller.api_key.pk if record.caller.api_key else None,
        "endpoint": record.endpoint,
        "model": record.model,
        "inputs": record.inputs,
        "status_code": record.status_code,
        "error_type": record.error_type,
        "latency_ms": record.latency_ms,
        "request_id": record.request_id,
        "created_at": timezone.now(),
    }
    with connection.cursor() as cursor:
        cursor.execute(_CHARGE_AND_LOG_SQL, params)
        row = cursor.fetchone()
    if row is None:
        return False
    _saw_spent(tenant_id=tenant.pk, period_start=period_start, tokens=int(row[0]))
    return True


def charge_and_log(*, record: UsageRecord) -> None:
    """Charges a served request's tokens to its tenant's monthly quota and writes its usage row,
    atomically: the quota total always equals the sum of the log. Raises QuotaExceeded (and
    charges nothing) when concurrent requests used up the quota first."""
    tenant = record.caller.tenant
    assert tenant is not None, "a served request always has a tenant"
    quota = effective_limits(tenant).monthly_token_quota
    period_start = current_period_start()
    if connection.vendor == "postgresql" and _charge_and_log_in_one_statement(
        record=record, period_start=period_start, quota=quota
    ):
        return
    # Elsewhere (SQLite), on the month's first charge (no row yet) and when the quota is spent.
    with transaction.atomic():
        charged = _charge(tenant=tenant, period_start=period_start, quota=quota, record=record)
        if not charged:
            # Either the quota is spent, or this is the month's first charge and its row does
            # not exist yet; the unique (tenant, month) makes concurrent creators agree on one.
            QuotaPeriod.objects.get_or_create(tenant=tenant, period_start=period_start)
            # Again whether this request created the row or lost the race to one that did: the
            # loser's get_or_create returns the winner's row, which it has not charged yet.
            charged = _charge(tenant=tenant, period_start=period_start, quota=quota, record=record)
        spent = period_use(tenant=tenant, period_start=period_start).tokens
        _saw_spent(tenant_id=tenant.pk, period_start=period_start, tokens=spent)
        if not charged:
            raise _quota_exceeded(quota=quota, spent=spent, tokens=record.tokens)
        _log(record)


def _charge(*, tenant: Tenant, period_start: date, quota: int, record: UsageRecord) -> bool:
    # The condition and the increment are one statement, so no interleaving can overspend.
    return bool(
        QuotaPeriod.objects.filter(
            tenant=tenant, period_start=period_start, tokens__lte=quota - record.tokens
        ).update(tokens=F("tokens") + record.tokens, requests=F("requests") + 1)
    )


def log_refusal(*, record: UsageRecord) -> UsageLog:
    """A refused request is logged, and charged nothing."""
    return _log(replace(record, tokens=0))
