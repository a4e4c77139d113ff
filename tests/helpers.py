"""Helpers the test modules share: one embed request, one check of the documented error shape,
what a tenant was charged and logged this month, and work released on many threads at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from django.db import connection, connections
from django.db.models import Sum
from django.test import Client

from accounts.models import QuotaPeriod, Tenant, UsageLog
from accounts.selectors import current_period_start
from tests.conftest import Person


def embed(
    who: Person | str,
    body: str | dict[str, Any] = "hello world",
    path: str = "/embed",
    **extra: Any,
) -> Any:
    """POSTs an embed request in-process as `who`: a Person, or a bearer credential (a JWT or an
    API key). `body` is the text to embed or the whole JSON body; `extra` are more headers in the
    test client's form (HTTP_X_TENANT=...). "hello world" is 4 tokens to the fake encoder: two
    words and two special tokens."""
    credential = who.token if isinstance(who, Person) else who
    return Client().post(
        path,
        {"text": body} if isinstance(body, str) else body,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {credential}",
        **extra,
    )


def get_usage(who: Person | str, **extra: Any) -> Any:
    """GETs /usage in-process as `who` (a Person, or a bearer credential)."""
    credential = who.token if isinstance(who, Person) else who
    return Client().get("/usage", HTTP_AUTHORIZATION=f"Bearer {credential}", **extra)


def assert_error(
    response: Any,
    status: int,
    *,
    error_type: str | None = None,
    code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    """Asserts the one documented error shape and, where given, its type, code and param."""
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    if error_type is not None:
        assert error["type"] == error_type
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


class ManualClock:
    """A monotonic clock that stands still until the test moves it, for code that takes a clock."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def charged(tenant: Tenant) -> int:
    """The tokens charged to the tenant's quota this month."""
    return QuotaPeriod.objects.get(tenant=tenant, period_start=current_period_start()).tokens


def logged(tenant: Tenant) -> int:
    """The tokens of the tenant's usage log, all of it."""
    return UsageLog.objects.filter(tenant=tenant).aggregate(total=Sum("tokens"))["total"] or 0


def at_once(work: Callable[[Any], Any], inputs: Iterable[Any]) -> list[Any]:
    """`work(input)` for each input, on threads released together; their results, in the order
    of the inputs (None where it raised).

    Each thread opens its database connection, one after another, before the release: the tests
    are about requests arriving together, and dozens of connects at the same instant on two
    cores can outlast the 2 s connect timeout (a 503 by design) on a slow machine."""
    jobs = list(inputs)
    start = threading.Barrier(len(jobs))
    one_connect_at_a_time = threading.Lock()
    results: list[Any] = [None] * len(jobs)

    def run(index: int) -> None:
        try:
            with one_connect_at_a_time:
                connection.ensure_connection()
            start.wait()
            results[index] = work(jobs[index])
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results
