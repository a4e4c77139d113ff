"""The quota ledger: the monthly quota pre-check, the charge with its usage row, and the
refusal row.

The charge statement reads the tenant's quota (tenant override, else plan, else the setting) from
the tenant and plan rows themselves, in the statement that charges, so a quota lowered by any
process (the admin, another worker) binds the next charge; no cache takes part in it. The
pre-check before the model may skip its query while this process last saw the tenant far from
its quota: that lets a request go on to the charge, which decides, and never serves by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from accounts.metering.group_commit import (
    ROWS_PARAM,
    ChargeGroups,
    ChargeSQL,
    PendingCharge,
    writes_in_turn,
)
from accounts.models import Plan, QuotaPeriod, Tenant, UsageLog
from accounts.selectors import current_period_start
from accounts.services import Caller
from embedplatform import metrics
from embedplatform.errors import QuotaExceeded
from embedplatform.ttl_cache import TtlCache

_QUOTA = QuotaPeriod._meta.db_table
_USAGE = UsageLog._meta.db_table
_TENANT = Tenant._meta.db_table
_PLAN = Plan._meta.db_table

# The tenant's quota as the database says it now, for a tenant id bound as %(tenant_id)s.
_LIVE_QUOTA_SQL = f"""(
    SELECT COALESCE(t.monthly_token_quota, p.monthly_token_quota, %(default_quota)s)
      FROM {_TENANT} t JOIN {_PLAN} p ON p.id = t.plan_id
     WHERE t.id = %(tenant_id)s
)"""

# The charge: conditional on the live quota, so no interleaving of requests can overspend.
# `requests` is 1, or the number of requests whose tokens a group charges at once.
_CHARGE_SQL = f"""
UPDATE {_QUOTA}
   SET tokens = tokens + %(tokens)s, requests = requests + %(requests)s
 WHERE tenant_id = %(tenant_id)s AND period_start = %(period_start)s
   AND tokens + %(tokens)s <= {_LIVE_QUOTA_SQL}
RETURNING tokens
"""

# The usage row's columns, with their types for a group's rows sent as JSON.
_USAGE_COLUMN_TYPES = {
    "tenant_id": "bigint",
    "user_id": "integer",
    "api_key_id": "bigint",
    "endpoint": "text",
    "model": "text",
    "inputs": "integer",
    "tokens": "bigint",
    "status_code": "smallint",
    "error_type": "text",
    "latency_ms": "double precision",
    "request_id": "text",
    "created_at": "timestamptz",
}
_USAGE_COLUMNS = ", ".join(_USAGE_COLUMN_TYPES)
_USAGE_VALUES = ", ".join(f"%({column})s" for column in _USAGE_COLUMN_TYPES)

# PostgreSQL: the charge and the usage row in one statement (one round trip); the row is written
# only if the charge happened. A statement is atomic on its own.
_CHARGE_AND_LOG_SQL = f"""
WITH charged AS ({_CHARGE_SQL}), logged AS (
    INSERT INTO {_USAGE} ({_USAGE_COLUMNS}) SELECT {_USAGE_VALUES} FROM charged RETURNING id
)
SELECT charged.tokens FROM charged, logged
"""

_LOG_SQL = f"INSERT INTO {_USAGE} ({_USAGE_COLUMNS}) VALUES ({_USAGE_VALUES})"

# A group's usage rows, from the JSON array `group_commit` sends them in.
_USAGE_RECORDS = ", ".join(f"{column} {kind}" for column, kind in _USAGE_COLUMN_TYPES.items())

# PostgreSQL, group commit: one tenant's charges of a group as one charge of their sum, and
# their usage rows, in one statement; the rows are written only if the charge happened.
_CHARGE_AND_LOG_ROWS_SQL = f"""
WITH charged AS ({_CHARGE_SQL}), logged AS (
    INSERT INTO {_USAGE} ({_USAGE_COLUMNS})
    SELECT usage_row.* FROM charged,
           jsonb_to_recordset(%({ROWS_PARAM})s::jsonb) AS usage_row({_USAGE_RECORDS})
    RETURNING id
)
SELECT charged.tokens FROM charged
"""

# Spent and quota, both live, in one query (the pre-check, and the message of a refusal).
_STANDING_SQL = f"""
SELECT {_LIVE_QUOTA_SQL},
       COALESCE((SELECT tokens FROM {_QUOTA}
                  WHERE tenant_id = %(tenant_id)s AND period_start = %(period_start)s), 0)
"""


@dataclass(frozen=True)
class UsageRecord:
    """One usage row as the log will hold it."""

    caller: Caller
    endpoint: str
    model: str
    inputs: int
    tokens: int
    status_code: int
    latency_ms: float
    request_id: str
    error_type: str = ""

    def params(self) -> dict[str, Any]:
        caller = self.caller
        return {
            "tenant_id": caller.tenant.pk if caller.tenant is not None else None,
            "user_id": caller.user_id,
            "api_key_id": caller.api_key.pk if caller.api_key is not None else None,
            "endpoint": self.endpoint,
            "model": self.model,
            "inputs": self.inputs,
            "tokens": self.tokens,
            "status_code": self.status_code,
            "error_type": self.error_type,
            "latency_ms": float(self.latency_ms),  # a group's JSON rows: always a float
            "request_id": self.request_id,
            "created_at": connection.ops.adapt_datetimefield_value(timezone.now()),
        }


# What this process last saw of each tenant: (month, tokens spent, quota). The pre-check trusts
# it for QUOTA_PRECHECK_CACHE_SECONDS while the tenant is far (10%) from its quota; other workers
# may have charged meanwhile, hence the headroom. Only ever a reason to go on to the charge,
# which reads the live rows. Bounded: the least recently seen tenants leave first.
_seen: TtlCache[int, tuple[date, int, int]] = TtlCache(
    maxsize=10_000, ttl=lambda: settings.QUOTA_PRECHECK_CACHE_SECONDS
)
_PRECHECK_HEADROOM = 0.1


def _standing(*, tenant_id: int, period_start: date) -> tuple[int, int]:
    """(quota, spent) of a tenant this period, from the database."""
    params = {
        "tenant_id": tenant_id,
        "period_start": connection.ops.adapt_datefield_value(period_start),
        "default_quota": settings.MONTHLY_TOKEN_QUOTA,
    }
    with connection.cursor() as cursor:
        cursor.execute(_STANDING_SQL, params)
        quota, spent = cursor.fetchone()
    quota = settings.MONTHLY_TOKEN_QUOTA if quota is None else int(quota)  # tenant deleted
    _seen.put(tenant_id, (period_start, int(spent), quota))
    return quota, int(spent)


def check_quota(*, tenant_id: int, tokens: int) -> None:
    """Refuses, before the model runs, a request that cannot fit in this month's quota."""
    period_start = current_period_start()
    seen = _seen.get(tenant_id)
    if (
        seen is not None
        and seen[0] == period_start
        and seen[1] + tokens <= seen[2] * (1 - _PRECHECK_HEADROOM)
    ):
        return
    quota, spent = _standing(tenant_id=tenant_id, period_start=period_start)
    if spent + tokens > quota:
        raise quota_exceeded(quota=quota, spent=spent, tokens=tokens)


def quota_exceeded(*, quota: int, spent: int, tokens: int) -> QuotaExceeded:
    metrics.QUOTA_EXCEEDED.inc()
    remaining = max(0, quota - spent)
    return QuotaExceeded(
        f"This request needs {tokens} tokens but only {remaining} of the tenant's monthly quota "
        f"of {quota} remain.",
        code="insufficient_quota",
    )


def _charge_params(record: UsageRecord, period_start: date) -> dict[str, Any]:
    return {
        **record.params(),
        "requests": 1,
        "period_start": connection.ops.adapt_datefield_value(period_start),
        "default_quota": settings.MONTHLY_TOKEN_QUOTA,
    }


def _note_spent(tenant_id: int, period_start: date, spent: int) -> None:
    seen = _seen.get(tenant_id)
    if seen is not None:  # else the next pre-check reads the quota from the database
        _seen.put(tenant_id, (period_start, spent, seen[2]))


def charge_and_log(*, record: UsageRecord) -> None:
    """Charges a served request's tokens to its tenant's monthly quota and writes its usage row,
    atomically: the quota total always equals the sum of the log. Raises QuotaExceeded (and
    charges nothing) when the live quota has no room left for them."""
    tenant = record.caller.tenant
    assert tenant is not None, "a served request always has a tenant"
    period_start = current_period_start()
    params = _charge_params(record, period_start)
    if _charges_in_groups():
        spent_after = _groups.charge(params)
    elif connection.vendor == "postgresql":  # the charge and the row in one statement
        spent_after = _tokens_after(_CHARGE_AND_LOG_SQL, params)
    else:
        spent_after = None
    _settle(tenant_id=tenant.pk, period_start=period_start, params=params, spent_after=spent_after)


@dataclass
class ChargeAfterModel:
    """A charge that the model's answer queues by itself (`charge_after_model`)."""

    pending: PendingCharge
    tenant_id: int
    period_start: date

    def wait(self, future: Future[Any], *, timeout: float) -> None:
        """For the model's answer (FutureTimeout past `timeout`: then nothing is charged) and
        then for the charge's group."""
        _groups.wait_for_model_and_charge(future, self.pending, timeout=timeout)

    def settle(self) -> None:
        """After `wait`, once the model answered: what `charge_and_log` does after its
        statement (the charge alone where the group's statement charged nothing)."""
        spent_after = self.pending.outcome()
        _settle(
            tenant_id=self.tenant_id,
            period_start=self.period_start,
            params=self.pending.params,
            spent_after=spent_after,
        )


def charge_after_model(
    *, future: Future[Any], tenant_id: int, record: Callable[[], UsageRecord]
) -> ChargeAfterModel | None:
    """`charge_and_log` of the usage record `record()`, queued by the thread that settles
    `future`, as soon as it has its result: the request thread then wakes once, for both.
    None where charges are not committed in groups: then charge after the model yourself."""
    if not _charges_in_groups():
        return None
    period_start = current_period_start()
    pending = _groups.charge_when_done(future, lambda: _charge_params(record(), period_start))
    return ChargeAfterModel(pending=pending, tenant_id=tenant_id, period_start=period_start)


def _charges_in_groups() -> bool:
    # Not inside a transaction of the caller's, which the charge must then be part of.
    return bool(settings.CHARGE_GROUP_COMMIT) and not connection.in_atomic_block


def _settle(
    *, tenant_id: int, period_start: date, params: dict[str, Any], spent_after: int | None
) -> None:
    """Where no statement has charged yet (`spent_after` None: SQLite outside a group, the
    month's first charge, whose quota row does not exist yet, a spent quota, or a group whose
    charges of this tenant did not fit together), the charge and its row in a transaction of
    their own; QuotaExceeded when the quota has no room."""
    if spent_after is None:
        with writes_in_turn(connection), transaction.atomic():
            spent_after = _charge(params)
            if spent_after is None:
                # Either the quota is spent, or this is the month's first charge and its row
                # does not exist yet; the unique (tenant, month) makes concurrent creators
                # agree on one.
                QuotaPeriod.objects.get_or_create(tenant_id=tenant_id, period_start=period_start)
                spent_after = _charge(params)
            if spent_after is None:
                quota, spent = _standing(tenant_id=tenant_id, period_start=period_start)
                raise quota_exceeded(quota=quota, spent=spent, tokens=int(params["tokens"]))
            with connection.cursor() as cursor:
                cursor.execute(_LOG_SQL, params)
    _note_spent(tenant_id, period_start, spent_after)


_groups = ChargeGroups(
    ChargeSQL(
        charge_and_log_rows=_CHARGE_AND_LOG_ROWS_SQL,
        charge=_CHARGE_SQL,
        log=_LOG_SQL,
        row_columns=tuple(_USAGE_COLUMN_TYPES),
    )
)


def close_charge_groups() -> None:
    """Ends this process's charge writer, after what it holds, and closes its connection."""
    _groups.close()


def _charge(params: dict[str, Any]) -> int | None:
    """The tenant's tokens after the charge, None when it did not happen."""
    return _tokens_after(_CHARGE_SQL, params)


def _tokens_after(sql: str, params: dict[str, Any]) -> int | None:
    """What a charge statement returns: the tenant's tokens after it, None when it charged
    nothing."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else int(row[0])


def log_uncharged(*, record: UsageRecord) -> None:
    """A usage row with zero tokens: a refused request, or one that costs nothing."""
    with writes_in_turn(connection), connection.cursor() as cursor:
        cursor.execute(_LOG_SQL, replace(record, tokens=0).params())


def log_refusal(*, record: UsageRecord) -> None:
    """A refused request is logged, and charged nothing."""
    log_uncharged(record=record)
