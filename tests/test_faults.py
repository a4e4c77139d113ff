"""Database and Redis faults on a real gunicorn, through a TCP proxy the test controls in front of
the machine's PostgreSQL and Redis: a refusing or hung dependency gives fast 503s with
Retry-After and one log line per failure, /health answers within about 2 s naming the failing
check, and what was served is charged exactly once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai
import pytest
import requests
from django.conf import settings
from django.db.models import Sum

from accounts.models import QuotaPeriod, UsageLog
from tests.conftest import Person
from tests.service import Service, database_url, start_service
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.service, pytest.mark.django_db(transaction=True)]

# /health's promise is "about 2 s"; the margin is for this shared, busy machine.
HEALTH_SECONDS = 2.8


def via(url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"{netloc[0]}@{proxy.address}" if len(netloc) == 2 else proxy.address
    return urlunsplit(parts._replace(netloc=host))


def upstream(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


@pytest.fixture
def db_proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy(upstream(database_url(), 5432))
    yield proxy
    proxy.close()


@pytest.fixture
def redis_proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy(upstream(settings.REDIS_URL, 6379))
    yield proxy
    proxy.close()


@pytest.fixture
def service(
    tmp_path: Path, db_proxy: TcpProxy, redis_proxy: TcpProxy, alice: Person
) -> Iterator[Service]:
    alice.tenant.requests_per_minute = 100_000
    alice.tenant.save(update_fields=["requests_per_minute"])
    running = start_service(
        tmp_path,
        env={
            "DATABASE_URL": via(database_url(), db_proxy),
            "REDIS_URL": via(settings.REDIS_URL, redis_proxy),
            "MODEL_QUANTIZATION": "fp32",
            # Round trips bounded at 1 + 2 s, so a hung database costs a request seconds.
            "DATABASE_STATEMENT_TIMEOUT_MS": "1000",
        },
    )
    yield running
    running.stop()


def timed(call: Any) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def embed(service: Service, person: Person) -> requests.Response:
    return service.post("/embed", json={"text": "fault tolerant"}, headers=person.headers)


def log_lines(service: Service, event: str) -> list[dict[str, Any]]:
    return [record for record in service.log_records() if record.get("event") == event]


def assert_charged_exactly_once(person: Person, served: list[requests.Response]) -> None:
    ids = [r.headers["x-request-id"] for r in served]
    rows = UsageLog.objects.filter(request_id__in=ids)
    assert sorted(rows.values_list("request_id", flat=True)) == sorted(ids)
    assert all(row.status_code == 200 and row.tokens > 0 for row in rows)
    returned = sum(r.json()["usage"]["total_tokens"] for r in served)
    logged = UsageLog.objects.filter(tenant=person.tenant, status_code=200).aggregate(
        t=Sum("tokens")
    )["t"]
    quota = QuotaPeriod.objects.filter(tenant=person.tenant).aggregate(t=Sum("tokens"))["t"]
    assert returned == logged == quota


def test_it_answers_503_database_unavailable_at_once_while_postgres_refuses(
    service: Service, db_proxy: TcpProxy, alice: Person
) -> None:
    served = [embed(service, alice)]
    assert served[0].status_code == 200

    db_proxy.set("refuse")
    refused, seconds = timed(lambda: embed(service, alice))
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "database_unavailable"
    assert refused.json()["error"]["type"] == "service_unavailable"
    assert int(refused.headers["Retry-After"]) > 0
    assert seconds < 2
    health, seconds = timed(lambda: service.get("/health"))
    assert health.status_code == 503
    assert health.json()["checks"]["database"].startswith("error")
    assert health.json()["checks"]["redis"] == "ok"
    assert seconds < HEALTH_SECONDS

    db_proxy.set("forward")
    served.append(embed(service, alice))
    assert served[-1].status_code == 200
    assert service.get("/health").status_code == 200

    # One line for the failed request, with its id, and no traceback anywhere.
    lines = log_lines(service, "database_unavailable")
    assert [line["request_id"] for line in lines] == [refused.headers["x-request-id"]]
    assert "Traceback" not in service.log()
    assert_charged_exactly_once(alice, served)


def test_it_gives_the_openai_client_a_503_it_recognises_while_postgres_refuses(
    service: Service, db_proxy: TcpProxy, alice: Person
) -> None:
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key=alice.token, max_retries=0)
    assert client.embeddings.create(model="all-MiniLM-L6-v2", input="before").data

    db_proxy.set("refuse")
    with pytest.raises(openai.InternalServerError) as unavailable:
        client.embeddings.create(model="all-MiniLM-L6-v2", input="during")
    # The client retries 5xx on its own, honouring Retry-After, so code written for OpenAI
    # backs off from an outage here as it does from one there.
    assert unavailable.value.status_code == 503
    assert unavailable.value.code == "database_unavailable"
    assert unavailable.value.type == "service_unavailable"
    assert int(unavailable.value.response.headers["Retry-After"]) > 0

    db_proxy.set("forward")
    assert client.embeddings.create(model="all-MiniLM-L6-v2", input="after").data


def test_it_answers_in_seconds_while_postgres_hangs(
    service: Service, db_proxy: TcpProxy, alice: Person
) -> None:
    served = [embed(service, alice) for _ in range(3)]  # connections kept by the threads
    assert [r.status_code for r in served] == [200] * 3

    db_proxy.set("hang")
    health, seconds = timed(lambda: service.get("/health"))
    assert health.status_code == 503
    assert health.json()["checks"]["database"].startswith("error")
    assert seconds < HEALTH_SECONDS
    for _ in range(2):
        refused, seconds = timed(lambda: embed(service, alice))
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "database_unavailable"
        assert "Retry-After" in refused.headers
        # A round trip is bounded at 3 s here, a connection at 2 s, and a failed request
        # makes no second attempt.
        assert seconds < 4.5

    db_proxy.set("forward")
    deadline = time.monotonic() + 10
    while (response := embed(service, alice)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert response.status_code == 200
    served.append(response)
    assert "Traceback" not in service.log()
    assert_charged_exactly_once(alice, served)


@pytest.mark.parametrize("mode", ["refuse", "hang"])
def test_it_names_redis_in_health_and_keeps_serving_while_redis_fails(
    service: Service, redis_proxy: TcpProxy, alice: Person, mode: Any
) -> None:
    redis_proxy.set(mode)
    health, seconds = timed(lambda: service.get("/health"))
    assert health.status_code == 503
    assert health.json()["checks"]["redis"].startswith("error")
    assert health.json()["checks"]["database"] == "ok"
    assert seconds < HEALTH_SECONDS
    # Rate limits fail open (RATE_LIMIT_FAIL_OPEN): served, or a 503 naming the cache.
    response, seconds = timed(lambda: embed(service, alice))
    assert seconds < 3
    assert response.status_code in {200, 503}, response.text
    if response.status_code == 503:
        assert response.json()["error"]["code"] == "cache_unavailable"
    redis_proxy.set("forward")
    assert service.get("/health").status_code == 200
    assert "Traceback" not in service.log()
