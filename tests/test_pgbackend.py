"""The PostgreSQL backend's pre-request health check (embedplatform/pgbackend): a round trip only
for a kept connection the server has spoken on while it sat idle."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.db import connections

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def kept() -> Iterator[Any]:
    """The default connection, open, as the next request finds it."""
    connection = connections["default"]
    if connection.vendor != "postgresql":
        pytest.skip("the health check under test is PostgreSQL's")
    connection.ensure_connection()
    yield connection
    connection.close()


def next_request(connection: Any) -> None:
    # What Django does before a request reuses a kept connection.
    connection.health_check_enabled = True
    connection.health_check_done = False


def test_it_sends_no_ping_for_a_connection_the_server_left_alone(
    kept: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings: list[bool] = []
    original = kept.is_usable

    def counted() -> bool:
        pings.append(True)
        return bool(original())

    monkeypatch.setattr(kept, "is_usable", counted)
    for _ in range(3):
        next_request(kept)
        kept.close_if_health_check_failed()
        with kept.cursor() as cursor:
            cursor.execute("SELECT 1")
    assert pings == []


def test_it_replaces_a_connection_the_server_ended_before_the_request_uses_it(kept: Any) -> None:
    ended = kept.connection.info.backend_pid
    settings = kept.settings_dict
    with psycopg.connect(
        host=settings["HOST"] or "127.0.0.1",
        port=settings["PORT"] or 5432,
        user=settings["USER"] or "postgres",
        dbname=settings["NAME"],
        autocommit=True,
    ) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [ended])
    deadline = time.monotonic() + 5
    while not kept._server_spoke() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kept._server_spoke(), "the server's goodbye should be waiting on the socket"

    next_request(kept)
    kept.close_if_health_check_failed()
    with kept.cursor() as cursor:  # a fresh connection: the request is served
        cursor.execute("SELECT pg_backend_pid()")
        (serving,) = cursor.fetchone()
    assert serving != ended
