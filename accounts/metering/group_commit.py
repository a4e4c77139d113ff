"""Group commit of charges: the charges that request threads of one worker make at the same
moment are committed as one transaction, on one connection of a writer thread.

Each request still leaves only after its own charge and usage row are committed: its thread
waits for the transaction that holds them. What changes is the cost. One charge statement per
request in its own transaction cost PostgreSQL about 235 us of CPU and the worker 150 us; in
transactions of 8-16 charges, 80-100 us and 65-85 us per charge (Intel, one client each,
`SELECT pg_backend_pid()`'s /proc CPU). On SQLite a group is one write transaction, one turn of
the process's write lock and one commit to the log, instead of one each per request.

A charge can also follow the model's answer with no request thread in between
(`charge_when_done`): the thread that settles the model's future queues the charge, and the
request thread wakes once, when both are done, instead of once for the model and once for the
commit.

A tenant's charges in a group are one charge of their sum: the same conditional charge as
alone (ledger's charge SQL), which happens only if the sum fits in the live quota, with their
usage rows written only if it did. One UPDATE of the tenant's quota row instead of one per
request: PostgreSQL keeps every version of a row that one transaction updates, and each UPDATE
walks past the ones before it. The statements of a group's tenants run one after the other
inside the transaction and each sees the ones before it: no interleaving can overspend. A
statement that charges nothing (the sum does not fit, or the month has no quota row yet) says
so, and each of its requests goes on as it would alone (ledger's slow path), which charges those
that fit one by one. A group that fails fails each of its requests with the error (a database
fault is the request's 503 `database_unavailable`): nothing of it was committed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from django.conf import settings
from django.db import connection, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.utils import OperationalError

from embedplatform import metrics
from embedplatform.faults import DATABASE_ERRORS, bounded_round_trip
from embedplatform.shutdown import wait_within_encode_timeout

# What a request is told when its group met a database fault: the same 503 as alone. The
# writer uses psycopg's connection directly, so psycopg's own classes count too.
_DATABASE_FAULTS: tuple[type[BaseException], ...] = (
    *DATABASE_ERRORS,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)

logger = logging.getLogger(__name__)

# Beyond this many charges a transaction holds the tenant's quota row longer than it saves.
MAX_GROUP = 64
# The parameter of PostgreSQL's statement for a tenant's charge that holds its usage rows, as a
# JSON array of objects: one string for psycopg to send, where an array per column costs it
# about half as much again (client CPU per group of 9: 320 us against 470).
ROWS_PARAM = "rows"


def _writer_bound() -> float:
    """The longest a caller waits for the writer. The writer bounds each round trip itself;
    this only guards against a writer gone wrong."""
    return 4 * float(settings.DATABASE_ROUND_TRIP_SECONDS) + 10


# SQLite has one write lock per database file, and a writer that finds it taken sleeps in
# SQLite's busy handler (1, 2, 5, 10, ... up to 100 ms at a time) instead of being woken when it
# frees: with dozens of request threads per worker, those sleeps made the tail latency. A
# worker's threads take turns on this lock instead, each woken as soon as the one before has
# committed; only writes of other workers still meet the busy handler. (A file lock for the
# workers' turns too was tried, and gained nothing measurable with two workers.)
_sqlite_writer = threading.Lock()


@contextlib.contextmanager
def writes_in_turn(db: BaseDatabaseWrapper) -> Iterator[None]:
    """One write transaction at a time per process on SQLite; no waiting elsewhere. Not inside
    a transaction already open: it may hold the write lock that the thread in turn waits for.
    The wait is bounded by the database's busy timeout, after which the write goes ahead and
    SQLite's own lock decides, as it always does: the turns only order the writers."""
    if db.vendor != "sqlite" or db.in_atomic_block:
        yield
        return
    patience = float(db.settings_dict.get("OPTIONS", {}).get("timeout", 5.0))
    in_turn = _sqlite_writer.acquire(timeout=patience)
    try:
        yield
    finally:
        if in_turn:
            _sqlite_writer.release()


@dataclass(frozen=True)
class ChargeSQL:
    """The statements of a tenant's charge: `charge_and_log_rows` charges and writes the usage
    rows (their `row_columns`, as a JSON array in `ROWS_PARAM`) in one statement (PostgreSQL);
    elsewhere `charge` runs, then `log` for each row (`row_columns` are its parameters) if it
    charged."""

    charge_and_log_rows: str
    charge: str
    log: str
    row_columns: tuple[str, ...]


@dataclass(frozen=True)
class TenantCharge:
    """The charges of one tenant and month in a group, as one: `members` are their places in
    the group, `params` the charge's (the sum of their tokens and their number of requests),
    and `rows` their usage rows' values (the row columns only)."""

    members: list[int]
    params: dict[str, Any]
    rows: list[dict[str, Any]]


def tenant_charges(group: list[dict[str, Any]], row_columns: tuple[str, ...]) -> list[TenantCharge]:
    """The group's charges by tenant and month, in the order each first appears."""
    members: dict[tuple[Any, Any], list[int]] = {}
    for place, params in enumerate(group):
        members.setdefault((params["tenant_id"], params["period_start"]), []).append(place)
    charges = []
    for places in members.values():
        rows = [group[place] for place in places]
        charges.append(
            TenantCharge(
                members=places,
                params={
                    **rows[0],
                    "tokens": sum(int(row["tokens"]) for row in rows),
                    "requests": sum(int(row["requests"]) for row in rows),
                },
                rows=[{column: row[column] for column in row_columns} for row in rows],
            )
        )
    return charges


# A charge's life: waiting for the model's answer, waiting for the writer, in a transaction,
# answered; or withdrawn by its request before the writer took it (the model was too slow).
_AWAITING_MODEL, _QUEUED, _COMMITTING, _ANSWERED, _WITHDRAWN = range(5)


class PendingCharge:
    """One request's charge, and its answer once the writer has committed its group."""

    __slots__ = ("_done", "error", "model_done_at", "params", "spent_after", "state")

    def __init__(self, params: dict[str, Any], state: int) -> None:
        self.params = params
        self.state = state
        self.spent_after: int | None = None
        self.error: BaseException | None = None
        self.model_done_at = 0.0  # perf_counter when the model's answer came (charge_when_done)
        # Held from birth and released once by the writer: a one-shot signal for a single
        # waiter. An Event would build a Condition (three locks, a deque) per charge.
        self._done = threading.Lock()
        self._done.acquire()

    def wait(self, timeout: float) -> bool:
        return self._done.acquire(timeout=timeout)

    def set(self) -> None:
        self._done.release()

    def outcome(self) -> int | None:
        """The tenant's tokens after the charge, or None when the statement charged nothing or
        its group failed otherwise than by a database fault (nothing of it was committed, so
        the caller's own path may charge it alone). Raises OperationalError on a fault."""
        if isinstance(self.error, _DATABASE_FAULTS):
            raise OperationalError(str(self.error)) from self.error
        if self.error is not None and not self.params:  # its parameters could not be made
            raise self.error
        return None if self.error is not None else self.spent_after


class ChargeGroups:
    """The writer thread of one worker process, and the charges waiting for it."""

    def __init__(self, sql: ChargeSQL) -> None:
        self._sql = sql
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._waiting: list[PendingCharge] = []
        self._thread: threading.Thread | None = None
        self._owner_pid = 0
        self._closing = False

    def charge(self, params: dict[str, Any]) -> int | None:
        """Commits one charge with its usage row, in a group with whatever other threads charge
        meanwhile; what `PendingCharge.outcome` says."""
        item = PendingCharge(params, _QUEUED)
        with self._lock:
            self._enqueue(item)
        self._wait_for_writer(item)
        return item.outcome()

    def charge_when_done(
        self, future: Future[Any], params: Callable[[], dict[str, Any]]
    ) -> PendingCharge:
        """Queues a charge as soon as `future` has its result, from the thread that settles it;
        `params()` is called then. A future that fails or is cancelled charges nothing. Wait for
        both with `wait_for_model_and_charge`."""
        item = PendingCharge({}, _AWAITING_MODEL)

        def model_done(settled: Future[Any]) -> None:
            failed = settled.cancelled() or settled.exception() is not None
            try:
                charge = None if failed else params()
            except BaseException as exc:  # the waiting request must hear of it
                item.error, charge = exc, None
            with self._lock:
                if item.state != _AWAITING_MODEL:  # withdrawn: its request gave up waiting
                    return
                item.model_done_at = time.perf_counter()
                if charge is None:
                    item.state = _ANSWERED
                    item.set()
                    return
                item.params = charge
                self._enqueue(item)

        future.add_done_callback(model_done)
        return item

    def wait_for_model_and_charge(
        self, future: Future[Any], item: PendingCharge, *, timeout: float
    ) -> None:
        """Waits for the model (at most `timeout`, cut short when the worker stops) and then for
        the charge `charge_when_done` queued. A model that has not answered by then is given
        up on: the charge is withdrawn, the future cancelled and FutureTimeout raised, and
        nothing is charged. Once the model has answered, the charge is waited for as alone
        (`charge`): the writer's own bound decides, not the model's."""
        if wait_within_encode_timeout(item.wait, timeout):
            return
        with self._lock:
            withdrawn = item.state == _AWAITING_MODEL
            if withdrawn:
                item.state = _WITHDRAWN
        if withdrawn:
            future.cancel()
            raise FutureTimeout
        self._wait_for_writer(item)

    def _wait_for_writer(self, item: PendingCharge) -> None:
        """Waits for a queued charge's group. Should the writer not answer within its bound, a
        charge it has not taken yet is withdrawn, so that the request's 503 is never followed
        by its charge; one the writer took is past recall (its round trips are bounded by the
        watchdog, so this is a writer gone wrong)."""
        if item.wait(_writer_bound()):
            return
        with self._lock:
            if item.state == _QUEUED:
                self._waiting.remove(item)
                item.state = _WITHDRAWN
        raise OperationalError("The database did not answer in time.")

    def _enqueue(self, item: PendingCharge) -> None:
        # Called with the lock held.
        self._ensure_thread()
        item.state = _QUEUED
        self._waiting.append(item)
        self._ready.notify()

    def _ensure_thread(self) -> None:
        # A thread does not survive fork: a process that inherited the groups starts its own.
        if self._thread is None or self._owner_pid != os.getpid() or not self._thread.is_alive():
            self._owner_pid = os.getpid()
            self._closing = False
            self._thread = threading.Thread(target=self._run, name="charge-writer", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Commits what is waiting, then ends the writer and closes its connection (a test
        database cannot be dropped while it is open). The next charge starts a new writer."""
        with self._lock:
            thread = self._thread
            if thread is None or self._owner_pid != os.getpid() or not thread.is_alive():
                return
            self._closing = True
            self._ready.notify()
        thread.join(timeout=_writer_bound())

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closing:
                    self._ready.wait()
                if not self._waiting:  # closing, and nothing left to commit
                    self._thread = None
                    break
                group, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
                for item in group:
                    item.state = _COMMITTING
            try:
                results = self._commit([item.params for item in group])
                for item, spent_after in zip(group, results, strict=True):
                    item.spent_after = spent_after
            except BaseException as exc:  # every waiting request must hear of it
                if not isinstance(exc, _DATABASE_FAULTS):
                    # Not the database: each request is charged alone instead, and someone
                    # should know why groups fail.
                    logger.warning(
                        "charge_group_failed", extra={"error": f"{type(exc).__name__}: {exc}"}
                    )
                for item in group:
                    item.error = exc
                try:
                    connection.close()  # the next group starts on a fresh connection
                except Exception:  # a broken connection may fail to close; it is gone anyway
                    connection.connection = None
            finally:
                for item in group:
                    item.state = _ANSWERED
                    item.set()
        with contextlib.suppress(Exception):  # closing: a connection already broken is gone
            connection.close()

    def _commit(self, group: list[dict[str, Any]]) -> list[int | None]:
        """One transaction: for each charge, its tenant's tokens after the group's charge of
        that tenant's requests, None where that charged nothing."""
        metrics.CHARGE_GROUP_SIZE.observe(len(group))
        if connection.connection is not None:
            # As before a request: a kept connection the server ended is replaced, not failed on.
            kept: Any = connection  # Django's health-check flags are missing from its stubs
            kept.health_check_enabled = connection.settings_dict["CONN_HEALTH_CHECKS"]
            kept.health_check_done = False
            connection.close_if_health_check_failed()
        connection.ensure_connection()
        if connection.vendor == "postgresql":
            return self._commit_pipelined(group)
        return self._commit_in_turn(group)

    def _commit_pipelined(self, group: list[dict[str, Any]]) -> list[int | None]:
        """PostgreSQL: one round trip, a statement per tenant pipelined, each one's answer
        read."""
        raw = connection.connection
        charges = tenant_charges(group, self._sql.row_columns)
        answers: list[int | None] = []
        round_trip = bounded_round_trip(raw.fileno(), settings.DATABASE_ROUND_TRIP_SECONDS)
        with round_trip, raw.transaction(), raw.cursor() as cursor:
            cursor.executemany(
                self._sql.charge_and_log_rows,
                [
                    {**charge.params, ROWS_PARAM: orjson.dumps(charge.rows).decode()}
                    for charge in charges
                ],
                returning=True,
            )
            while True:
                row = cursor.fetchone()
                answers.append(None if row is None else int(row[0]))
                if not cursor.nextset():
                    break
            if len(answers) != len(charges):  # roll back what could not be told to its request
                raise psycopg.InterfaceError(f"{len(answers)} answers to {len(charges)} charges")
        return _each_member(group, charges, answers)

    def _commit_in_turn(self, group: list[dict[str, Any]]) -> list[int | None]:
        """SQLite: a charge per tenant, one after the other in one write transaction taken in
        this process's turn, the usage rows written (in one executemany) only where their
        charge happened."""
        charges = tenant_charges(group, self._sql.row_columns)
        answers: list[int | None] = []
        with writes_in_turn(connection), transaction.atomic(), connection.cursor() as cursor:
            for charge in charges:
                cursor.execute(self._sql.charge, charge.params)
                row = cursor.fetchone()
                if row is not None:
                    cursor.executemany(self._sql.log, charge.rows)
                answers.append(None if row is None else int(row[0]))
        return _each_member(group, charges, answers)


def _each_member(
    group: list[dict[str, Any]], charges: list[TenantCharge], answers: list[int | None]
) -> list[int | None]:
    """Each charge's answer: its tenant's tokens after the group's charge of them, or None."""
    results: list[int | None] = [None] * len(group)
    for charge, answer in zip(charges, answers, strict=True):
        for place in charge.members:
            results[place] = answer
    return results
