"""django-prometheus's PostgreSQL backend (query metrics) with every round trip bounded.

statement_timeout makes the server cancel a slow query, but a server that accepted the connection
and then went silent (hung, half-failed over, a stuck proxy) would keep the request waiting
forever: here each query, commit, rollback and the pre-request health check is bounded by
DATABASE_ROUND_TRIP_SECONDS (statement_timeout plus a margin), after which the connection is
shut down and the request gets a 503 `database_unavailable`.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db.utils import OperationalError
from django_prometheus.db.backends.postgresql import base

from embedplatform.faults import bounded_round_trip, database_failed_in_this_request


class DatabaseWrapper(base.DatabaseWrapper):
    health_check_done: bool  # Django's; its base here is untyped (django_prometheus)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.execute_wrappers.append(self._bounded_execute)
        self._went_silent = False

    # Once the database failed a request, its further queries (the refusal's usage row, say)
    # fail at once instead of each waiting out a timeout again.
    def ensure_connection(self) -> None:
        if self.connection is None and database_failed_in_this_request():
            raise OperationalError("The database already failed this request.")
        super().ensure_connection()

    def _cursor(self, name: Any = None) -> Any:
        if database_failed_in_this_request():
            raise OperationalError("The database already failed this request.")
        return super()._cursor(name)

    def _round_trip(self) -> Any:
        try:
            fd = self.connection.fileno() if self.connection is not None else None
        except Exception:  # a lost connection has no socket; its use fails on its own
            fd = None
        return bounded_round_trip(fd, settings.DATABASE_ROUND_TRIP_SECONDS)

    def _bounded_execute(
        self, execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any
    ) -> Any:
        with self._round_trip():
            return execute(sql, params, many, context)

    def _commit(self) -> None:
        with self._round_trip():
            super()._commit()

    def _rollback(self) -> None:
        with self._round_trip():
            super()._rollback()

    def is_usable(self) -> bool:
        with self._round_trip() as trip:
            usable = bool(super().is_usable())
        self._went_silent = trip.tripped
        return usable and not trip.tripped

    def _server_spoke(self) -> bool:
        """Whether the kept connection's socket has something to read, or failed, while idle."""
        try:
            fd = self.connection.fileno()
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLPRI)
            return bool(poller.poll(0))
        except Exception:  # no socket, or one that cannot be polled: ping as Django would
            return True

    def close_if_health_check_failed(self) -> None:
        """Django's pre-request check, except that a server that is there but silent fails the
        request at once: reconnecting would only wait again."""
        if self.connection is None or not self.health_check_enabled or self.health_check_done:
            return
        # An idle connection has nothing to read. A server that restarted, or ended the session,
        # has sent its goodbye (or the socket failed): only then is the ping worth a round trip.
        if not self._server_spoke():
            self.health_check_done = True
            return
        if not self.is_usable():
            went_silent = self._went_silent
            self.close()
            if went_silent:
                raise OperationalError("The database did not answer its health check in time.")
        self.health_check_done = True
