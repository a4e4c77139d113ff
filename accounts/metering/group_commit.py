"""Group commit of charges: the charges that request threads of one worker make at the same
moment go to PostgreSQL as one pipelined transaction, on one connection of a writer thread.

Each request still leaves only after its own charge and usage row are committed: its thread
waits for the transaction that holds them. What changes is the cost. One charge statement per
request in its own transaction cost PostgreSQL about 235 us of CPU and the worker 150 us; in
transactions of 8-16 charges, 80-100 us and 65-85 us per charge (Intel, one client each,
`SELECT pg_backend_pid()`'s /proc CPU).

Every statement in a group is the same conditional charge as alone (ledger._CHARGE_AND_LOG_SQL),
so the statements run one after the other inside the transaction and each sees the ones before
it: no interleaving can overspend. A statement that charges nothing (the quota is spent, or the
month has no quota row yet) says so, and its request goes on as it would alone (ledger's slow
path). A group that fails fails each of its requests with the error (a database fault is the
request's 503 `database_unavailable`): nothing of it was committed.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import psycopg
from django.conf import settings
from django.db import connection
from django.db.utils import OperationalError

from embedplatform import metrics
from embedplatform.faults import DATABASE_ERRORS, bounded_round_trip

# What a request is told when its group met a database fault: the same 503 as alone. The
# writer uses psycopg's connection directly, so psycopg's own classes count too.
_DATABASE_FAULTS: tuple[type[BaseException], ...] = (
    *DATABASE_ERRORS,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)

# Beyond this many charges a transaction holds the tenant's quota row longer than it saves.
MAX_GROUP = 64


def _writer_bound() -> float:
    """The longest a caller waits for the writer. The writer bounds each round trip itself;
    this only guards against a writer gone wrong."""
    return 4 * float(settings.DATABASE_ROUND_TRIP_SECONDS) + 10


class _Charge:
    """One request's charge, and its answer once the writer has committed its group."""

    __slots__ = ("_done", "error", "params", "spent_after")

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.spent_after: int | None = None
        self.error: BaseException | None = None
        # Held from birth and released once by the writer: a one-shot signal for a single
        # waiter. An Event would build a Condition (three locks, a deque) per charge.
        self._done = threading.Lock()
        self._done.acquire()

    def wait(self, timeout: float) -> bool:
        return self._done.acquire(timeout=timeout)

    def set(self) -> None:
        self._done.release()


class ChargeGroups:
    """The writer thread of one worker process, and the charges waiting for it."""

    def __init__(self, sql: str) -> None:
        self._sql = sql
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._waiting: list[_Charge] = []
        self._thread: threading.Thread | None = None
        self._owner_pid = 0
        self._closing = False

    def charge(self, params: dict[str, Any]) -> int | None:
        """Commits one charge with its usage row, in a group with whatever other threads charge
        meanwhile; the tenant's tokens after it, or None when the statement charged nothing or
        its group failed otherwise than by a database fault (nothing of it was committed, so
        the caller's own path may charge it alone). Raises OperationalError on a fault."""
        item = _Charge(params)
        with self._lock:
            self._ensure_thread()
            self._waiting.append(item)
            self._ready.notify()
        if not item.wait(_writer_bound()):
            raise OperationalError("The database did not answer in time.")
        if isinstance(item.error, _DATABASE_FAULTS):
            raise OperationalError(str(item.error)) from item.error
        return None if item.error is not None else item.spent_after

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
            try:
                results = self._commit([item.params for item in group])
            except BaseException as exc:  # every waiting request must hear of it
                for item in group:
                    item.error = exc
                try:
                    connection.close()  # the next group starts on a fresh connection
                except Exception:  # a broken connection may fail to close; it is gone anyway
                    connection.connection = None
            else:
                for item, spent_after in zip(group, results, strict=True):
                    item.spent_after = spent_after
            finally:
                for item in group:
                    item.set()
        with contextlib.suppress(Exception):  # closing: a connection already broken is gone
            connection.close()

    def _commit(self, group: list[dict[str, Any]]) -> list[int | None]:
        """One transaction, one round trip: the statements pipelined, each one's answer read."""
        metrics.CHARGE_GROUP_SIZE.observe(len(group))
        if connection.connection is not None:
            # As before a request: a kept connection the server ended is replaced, not failed on.
            kept: Any = connection  # Django's health-check flags are missing from its stubs
            kept.health_check_enabled = connection.settings_dict["CONN_HEALTH_CHECKS"]
            kept.health_check_done = False
            connection.close_if_health_check_failed()
        connection.ensure_connection()
        raw = connection.connection
        results: list[int | None] = []
        round_trip = bounded_round_trip(raw.fileno(), settings.DATABASE_ROUND_TRIP_SECONDS)
        with round_trip, raw.transaction(), raw.cursor() as cursor:
            cursor.executemany(self._sql, group, returning=True)
            while True:
                row = cursor.fetchone()
                results.append(None if row is None else int(row[0]))
                if not cursor.nextset():
                    break
        return results
