"""The service as users meet it: a real gunicorn process with the real model, over HTTP, and the
official `openai` client pointed at it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import requests

from accounts import services
from accounts.models import Tenant, UsageLog
from tests.conftest import Person
from tests.service import Service, start_service, wait_until_healthy

pytestmark = [pytest.mark.service, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def minilm_service(
    django_db_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    service = start_service(tmp_path_factory.mktemp("minilm"), env={"MODEL_QUANTIZATION": "fp32"})
    yield service
    service.stop()


@pytest.fixture(scope="module")
def gemma_service(
    django_db_setup: None, tmp_path_factory: pytest.TempPathFactory, gemma_tiny_path: Path
) -> Iterator[Service]:
    service = start_service(
        tmp_path_factory.mktemp("gemma"),
        env={"MODEL_NAME": str(gemma_tiny_path), "MODEL_QUANTIZATION": "auto"},
    )
    yield service
    service.stop()


def log_events(service: Service, event: str) -> list[dict[str, Any]]:
    events = []
    for line in service.log().splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                events.append(record)
    return events


def test_it_logs_one_structured_line_when_the_model_is_loaded(minilm_service: Service) -> None:
    (loaded,) = log_events(minilm_service, "model_loaded_successfully")
    assert loaded["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert loaded["dtype"] == "fp32"
    assert loaded["dimensions"] == 384
    assert loaded["max_seq_length"] == 256
    assert loaded["seconds"] > 0


def test_it_reports_health_with_the_model(minilm_service: Service) -> None:
    body = minilm_service.get("/health").json()
    assert body["status"] == "ok"
    assert (body["model"], body["dimensions"], body["dtype"]) == (
        "sentence-transformers/all-MiniLM-L6-v2",
        384,
        "fp32",
    )
    assert body["checks"] == {"model": "ok", "database": "ok", "redis": "ok"}


def test_it_serves_all_three_embed_apis(minilm_service: Service, alice: Person) -> None:
    one = minilm_service.post(
        "/embed", json={"text": "안녕하세요, 반갑습니다!"}, headers=alice.headers
    )
    many = minilm_service.post(
        "/batch-embed", json={"texts": ["첫 번째", "두 번째", "세 번째"]}, headers=alice.headers
    )
    oai = minilm_service.post("/v1/embeddings", json={"input": ["첫 번째"]}, headers=alice.headers)
    assert [r.status_code for r in (one, many, oai)] == [200, 200, 200]
    assert len(one.json()["embedding"]) == 384
    assert len(many.json()["embeddings"]) == 3
    np.testing.assert_allclose(
        many.json()["embeddings"][0], oai.json()["data"][0]["embedding"], atol=1e-5
    )
    ids = {r.headers["x-request-id"] for r in (one, many, oai)}
    logged = set(UsageLog.objects.filter(tenant=alice.tenant).values_list("request_id", flat=True))
    assert ids == logged


def test_it_echoes_the_callers_request_id(minilm_service: Service, alice: Person) -> None:
    response = minilm_service.post(
        "/embed", json={"text": "x"}, headers={**alice.headers, "X-Request-ID": "trace-42"}
    )
    assert response.headers["x-request-id"] == "trace-42"
    assert UsageLog.objects.get(request_id="trace-42").tenant == alice.tenant


def test_it_shares_forward_passes_between_concurrent_requests(
    minilm_service: Service, alice: Person
) -> None:
    def one(i: int) -> int:
        body = {"text": f"concurrent request number {i}"}
        return minilm_service.post("/embed", json=body, headers=alice.headers).status_code

    before = batch_histogram(minilm_service)
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(48)))
    after = batch_histogram(minilm_service)
    assert statuses == [200] * 48
    passes = after["count"] - before["count"]
    texts = after["sum"] - before["sum"]
    assert texts == 48
    assert passes < 48, "with 16 clients at once, some requests must share a forward pass"


def batch_histogram(service: Service) -> dict[str, float]:
    return histogram(service, "embed_batch_size")


def histogram(service: Service, metric: str) -> dict[str, float]:
    """The count and sum of a histogram on the service's /metrics page."""
    text = service.get("/metrics").text
    values = {}
    for line in text.splitlines():
        for name in ("count", "sum"):
            if line.startswith(f"{metric}_{name} "):
                values[name] = float(line.split()[-1])
    return values


def test_it_serves_the_embeddinggemma_architecture(gemma_service: Service, alice: Person) -> None:
    health = gemma_service.get("/health").json()
    assert health["model"] == "gemma-tiny"
    assert {"query", "document", "Clustering", "STS"} <= set(health["prompts"])
    native = health["dimensions"]
    body = {"text": "Which planet is known as the red planet?", "prompt_name": "query"}
    query = gemma_service.post("/embed", json=body, headers=alice.headers).json()
    half = gemma_service.post(
        "/embed", json={**body, "dimensions": native // 2}, headers=alice.headers
    ).json()
    assert len(query["embedding"]) == native
    assert len(half["embedding"]) == native // 2
    assert np.linalg.norm(half["embedding"]) == pytest.approx(1.0, abs=1e-4)
    (loaded,) = log_events(gemma_service, "model_loaded_successfully")
    assert loaded["dtype"] in {"bf16", "int8"}


# --- The official openai client ----------------------------------------------------------------


def client_for(service: Service, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=api_key, max_retries=0)


def test_it_works_with_the_openai_client_unchanged(minilm_service: Service, alice: Person) -> None:
    client = client_for(minilm_service, alice.token)
    texts = ["The quick brown fox", "빠른 갈색 여우", "An unrelated sentence about taxes"]
    # The client asks for base64 by default and decodes it itself.
    default = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    floats = client.embeddings.create(
        model="sentence-transformers/all-MiniLM-L6-v2", input=texts, encoding_format="float"
    )
    assert [d.index for d in default.data] == [0, 1, 2]
    for a, b in zip(default.data, floats.data, strict=True):
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=1e-6)
    assert default.usage.prompt_tokens == default.usage.total_tokens > 0
    assert default.model == "sentence-transformers/all-MiniLM-L6-v2"
    short = client.embeddings.create(model="all-MiniLM-L6-v2", input="x", dimensions=128)
    assert len(short.data[0].embedding) == 128


def test_it_gives_the_openai_client_errors_it_understands(
    minilm_service: Service, alice: Person
) -> None:
    client = client_for(minilm_service, alice.token)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.BadRequestError, match="empty"):  # OpenAI's 400
        client.embeddings.create(model="all-MiniLM-L6-v2", input="")
    with pytest.raises(openai.AuthenticationError):
        client_for(minilm_service, "not-a-token").embeddings.create(
            model="all-MiniLM-L6-v2", input="x"
        )


def test_it_accepts_token_ids_from_the_openai_client(
    minilm_service: Service, alice: Person
) -> None:
    from embeddings.token_inputs import cl100k

    # OpenAI's meaning (TOKEN_ID_INPUT=tiktoken, the default); native ids: tests/test_clients.py.
    ids = cl100k().encode("tokens from a client")
    client = client_for(minilm_service, alice.token)
    by_ids = client.embeddings.create(model="all-MiniLM-L6-v2", input=[ids])
    by_text = client.embeddings.create(model="all-MiniLM-L6-v2", input=["tokens from a client"])
    assert float(np.dot(by_ids.data[0].embedding, by_text.data[0].embedding)) > 0.999


# --- Start-up failures -------------------------------------------------------------------------


def test_it_does_not_serve_when_the_model_cannot_be_loaded(
    django_db_setup: None, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError) as failure:
        start_service(
            tmp_path, env={"MODEL_NAME": str(tmp_path / "no-such-model")}, ready_timeout=90
        )
    assert "Could not load model" in str(failure.value)


def test_it_says_a_gated_model_needs_hf_token(django_db_setup: None, tmp_path: Path) -> None:
    env = {"MODEL_NAME": "google/embeddinggemma-300m", "HF_TOKEN": "", "HF_HOME": str(tmp_path)}
    with pytest.raises(RuntimeError) as failure:
        start_service(tmp_path, env=env, ready_timeout=90)
    assert "HF_TOKEN" in str(failure.value)


def test_it_reports_unhealthy_when_the_database_is_unreachable(
    django_db_setup: None, tmp_path: Path
) -> None:
    service = start_service(
        tmp_path, env={"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"}, wait=False
    )
    try:
        response = None
        for _ in range(300):
            try:
                response = requests.get(service.url + "/health", timeout=10)
                if response.json()["checks"]["model"] == "ok":
                    break
            except (requests.ConnectionError, requests.Timeout):
                if service.process.poll() is not None:
                    pytest.fail(service.log())
            time.sleep(0.2)
        assert response is not None
        assert response.status_code == 503
        body = response.json()
        assert body["checks"]["model"] == "ok"
        assert body["checks"]["database"].startswith("error")
        assert body["error"]["type"] == "service_unavailable"
    finally:
        service.stop()


def test_it_runs_torch_with_cores_divided_by_workers(django_db_setup: None, tmp_path: Path) -> None:
    service = start_service(tmp_path, workers=2)
    try:
        # /health answers as soon as one worker is ready; the other may still be loading.
        deadline = time.monotonic() + 60
        while len(loaded := log_events(service, "model_loaded_successfully")) < 2:
            assert time.monotonic() < deadline, service.log()
            time.sleep(0.2)
        assert len({record["pid"] for record in loaded}) == 2
        cores = len(os.sched_getaffinity(0))
        assert {record["torch_threads"] for record in loaded} == {max(1, cores // 2)}
    finally:
        service.stop()


def test_it_reads_a_chunked_request_body(minilm_service: Service, alice: Person) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"texts": ["sent in '
        yield b'chunks", "without a Content-Length"]}'

    headers = {**alice.headers, "Content-Type": "application/json"}
    response = minilm_service.post("/batch-embed", data=chunks(), headers=headers)
    assert response.status_code == 200, response.text
    assert len(response.json()["embeddings"]) == 2


def test_it_refuses_a_chunked_body_over_the_limit(minilm_service: Service, alice: Person) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(5 * 1024):  # 5 MiB, over the 4 MiB default
            yield b"x" * 1024

    headers = {**alice.headers, "Content-Type": "application/json"}
    response = minilm_service.post("/embed", data=chunks(), headers=headers)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def tenant_whose_window_ends_in(low: float, high: float) -> tuple[Tenant, float]:
    """A new tenant whose requests-per-minute window ends `low` to `high` seconds from now (each
    tenant's window has a jitter of its own), so a test can wait for it; and when it ends."""
    from accounts.ratelimit import window_end

    for number in range(500):
        tenant = services.create_tenant(name=f"window {number}")
        ends = window_end(f"tenant:{tenant.pk}") + 1
        if low <= ends - time.time() <= high:
            return tenant, ends
    raise AssertionError("no tenant's window ends soon enough")


def test_it_serves_the_openai_clients_first_retry_after_a_rate_limit(
    minilm_service: Service,
) -> None:
    """The client waits what retry-after-ms / Retry-After says, once (max_retries=1): that is
    enough, because they are never early."""
    for _ in range(5):
        tenant, window_ends = tenant_whose_window_ends_in(3.0, 8.0)
        Tenant.objects.filter(pk=tenant.pk).update(requests_per_minute=1)
        _, key = services.create_api_key(tenant=tenant, name="retry")
        client = openai.OpenAI(base_url=f"{minilm_service.url}/v1", api_key=key, max_retries=1)
        client.embeddings.create(model="all-MiniLM-L6-v2", input="first")
        if time.time() < window_ends - 1.0:
            break  # still well inside the window: the next request will be refused
    else:
        raise AssertionError("five first requests each took seconds: the machine is swamped")
    started = time.monotonic()
    response = client.embeddings.create(model="all-MiniLM-L6-v2", input="second")
    assert len(response.data) == 1
    assert time.monotonic() - started < 12
    rows = list(UsageLog.objects.filter(tenant=tenant).order_by("pk").values_list("status_code"))
    assert rows == [(200,), (429,), (200,)]


def test_it_serves_16_concurrent_clients_on_the_embedded_sqlite_default(
    django_db_setup: None, tmp_path: Path
) -> None:
    """The quick start's database under load: no "database is locked", every request charged
    and logged exactly once, charges committed in groups, WAL on."""
    import sqlite3
    import subprocess
    import sys
    import uuid

    from accounts.jwt import mint_token
    from tests.service import ROOT

    database = tmp_path / "db.sqlite3"
    env = {"DATABASE_URL": f"sqlite:///{database}", "REDIS_URL": ""}
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--verbosity", "0"],
        cwd=ROOT,
        env={**os.environ, **env, "DJANGO_SETTINGS_MODULE": "embedplatform.settings"},
        check=True,
        timeout=300,
    )
    service = start_service(
        tmp_path, env={**env, "MODEL_QUANTIZATION": "fp32"}, workers=2, wait=False
    )
    try:
        wait_until_healthy(service, timeout=300)
        # Four users, four first requests each at once: provisioning races on SQLite too.
        tokens = [
            mint_token(subject=str(uuid.uuid4()), email=f"u{n}@example.com") for n in range(4)
        ]

        def client(number: int) -> list[int]:
            session = requests.Session()
            headers = {"Authorization": f"Bearer {tokens[number % 4]}"}
            return [
                session.post(
                    f"{service.url}/embed", json={"text": f"query {number} {i}"}, headers=headers
                ).status_code
                for i in range(6)
            ]

        with ThreadPoolExecutor(16) as pool:
            statuses = [status for batch in pool.map(client, range(16)) for status in batch]
        groups = histogram(service, "embed_charge_group_size")
    finally:
        service.stop()
    assert statuses == [200] * 96
    assert groups["sum"] == 96  # every charge went through a worker's writer once
    assert groups["count"] < 96  # and some shared a write transaction
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows, logged = connection.execute(
            "SELECT COUNT(*), SUM(tokens) FROM accounts_usagelog WHERE status_code = 200"
        ).fetchone()
        charged, requests_charged = connection.execute(
            "SELECT SUM(tokens), SUM(requests) FROM accounts_quotaperiod"
        ).fetchone()
        (tenants,) = connection.execute("SELECT COUNT(*) FROM accounts_tenant").fetchone()
    assert rows == requests_charged == 96
    assert logged == charged > 0
    assert tenants == 4
