"""embedplatform/gunicorn.conf.py: sizing from the environment and the cores (container CPU limits
included), graceful shutdown under load, and a JSON access log that leaks no credential."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from accounts.models import UsageLog
from tests.conftest import Person
from tests.service import ROOT, Service, start_service

CONF = ROOT / "embedplatform" / "gunicorn.conf.py"
CORES = len(os.sched_getaffinity(0))


def load_conf(env: dict[str, str], *, cgroup_root: Path | None = None) -> dict[str, Any]:
    """Reads the config file the way gunicorn does (in a child process, since it sets the
    environment the workers inherit) and returns its settings and that environment."""
    script = f"""
import json, os, runpy, pathlib
conf = runpy.run_path({str(CONF)!r})
root = {str(cgroup_root) if cgroup_root else None!r}
print(json.dumps({{
    "workers": conf["workers"], "threads": conf["threads"], "worker_class": conf["worker_class"],
    "timeout": conf["timeout"], "graceful_timeout": conf["graceful_timeout"],
    "torch_threads": int(os.environ["TORCH_THREADS"]),
    "web_concurrency": int(os.environ["WEB_CONCURRENCY"]),
    "cores": conf["available_cores"](pathlib.Path(root)) if root else conf["cores"],
}}))
"""
    base = {
        key: value
        for key, value in os.environ.items()
        if key not in {"WEB_CONCURRENCY", "GUNICORN_THREADS", "TORCH_THREADS"}
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        # Set, so that reading the file creates no metrics directory.
        env={**base, "PROMETHEUS_MULTIPROC_DIR": "/nonexistent/metrics", **env},
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    return dict(json.loads(result.stdout))


# --- Sizing -----------------------------------------------------------------------------------


def test_it_defaults_to_one_worker_per_core_up_to_four_sharing_the_cores_for_torch() -> None:
    conf = load_conf({})
    assert conf["worker_class"] == "embedplatform.shutdown.GracefulThreadWorker"
    assert conf["workers"] == min(CORES, 4)
    assert conf["threads"] == 32
    assert conf["torch_threads"] == max(1, CORES // conf["workers"])
    assert conf["web_concurrency"] == conf["workers"]
    assert conf["timeout"] == 120
    assert conf["graceful_timeout"] == 30


def test_it_takes_workers_and_threads_from_the_environment() -> None:
    conf = load_conf({"WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "8"})
    assert (conf["workers"], conf["threads"]) == (2, 8)
    # WEB_CONCURRENCY drives the torch threads of each worker.
    assert conf["torch_threads"] == max(1, CORES // 2)


def test_it_keeps_an_explicit_torch_thread_count() -> None:
    assert load_conf({"TORCH_THREADS": "3", "WEB_CONCURRENCY": "1"})["torch_threads"] == 3


def test_it_takes_timeouts_from_the_environment() -> None:
    conf = load_conf({"GUNICORN_TIMEOUT": "300", "GUNICORN_GRACEFUL_TIMEOUT": "45"})
    assert (conf["timeout"], conf["graceful_timeout"]) == (300, 45)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2, `cpus: '1.5'`
        ({"cpu.max": "100000 100000\n"}, 1),  # cgroup v2, `cpus: '1.0'`
        ({"cpu.max": "max 100000\n"}, CORES),  # cgroup v2, no limit
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, CORES),
        ({}, CORES),  # no cgroup files at all
    ],
    ids=["v2-1.5", "v2-1", "v2-max", "v1-1", "v1-unlimited", "none"],
)
def test_it_counts_only_the_cores_a_container_may_use(
    tmp_path: Path, files: dict[str, str], expected: int
) -> None:
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    assert load_conf({}, cgroup_root=tmp_path)["cores"] == min(CORES, expected)


# --- A running server -------------------------------------------------------------------------


def log_records(service: Service) -> list[dict[str, Any]]:
    return [json.loads(line) for line in service.log().splitlines() if line.strip()]


@pytest.mark.service
@pytest.mark.django_db(transaction=True)
def test_it_logs_json_lines_with_request_ids_and_no_credentials(
    alice: Person, tmp_path: Path
) -> None:
    service = start_service(tmp_path, env={"MODEL_QUANTIZATION": "fp32"})
    token = alice.token
    try:
        served = service.post(
            "/embed",
            json={"text": "log me"},
            headers={"Authorization": f"Bearer {token}", "X-Request-ID": "trace-log-1"},
        )
        refused = service.post(
            "/embed", json={"text": "x"}, headers={"Authorization": "Bearer not-a-real-token"}
        )
        odd = service.get('/no/"such"\\path', headers={"User-Agent": 'agent "quoted" \\ back'})
        assert [r.status_code for r in (served, refused, odd)] == [200, 401, 404]
    finally:
        assert service.stop() == 0

    # Every line, gunicorn's own and the app's included, is one JSON object.
    records = log_records(service)
    access = [r for r in records if r.get("logger") == "gunicorn.access"]
    by_id = {r["request_id"]: r for r in access}
    line = by_id["trace-log-1"]
    assert (line["method"], line["path"], line["status"]) == ("POST", "/embed", 200)
    assert line["duration_ms"] > 0
    assert by_id[refused.headers["x-request-id"]]["status"] == 401
    quoted = by_id[odd.headers["x-request-id"]]
    assert quoted["path"] == '/no/"such"\\path'
    assert quoted["user_agent"] == 'agent "quoted" \\ back'
    assert all(r["request_id"] for r in access)
    text = service.log()
    assert token not in text
    assert "not-a-real-token" not in text
    assert "Bearer" not in text


def http_request_sent(url: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
    """An HTTP request whose bytes have been written, its response not yet read."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    connection.request(
        "POST", path, json.dumps(body), {**headers, "Content-Type": "application/json"}
    )
    return connection


@pytest.mark.service
@pytest.mark.django_db(transaction=True)
def test_it_finishes_requests_in_flight_when_told_to_stop(alice: Person, tmp_path: Path) -> None:
    alice.tenant.requests_per_minute = 100_000
    alice.tenant.save(update_fields=["requests_per_minute"])
    service = start_service(tmp_path, workers=2, env={"MODEL_QUANTIZATION": "fp32"})
    # Each request is a few hundred milliseconds of model work; together, seconds.
    words = "the quick brown fox jumps over the lazy dog while the band plays on " * 8
    in_flight = 8
    results: list[tuple[int, float, str]] = []
    errors: list[BaseException] = []
    all_sent = threading.Barrier(in_flight + 1)

    def client(i: int) -> None:
        try:
            connection = http_request_sent(
                service.url,
                "/batch-embed",
                {"texts": [f"{i} {j} {words}" for j in range(16)]},
                alice.headers,
            )
            all_sent.wait()
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                errors.append(AssertionError(f"{response.status}: {body[:300]!r}"))
            results.append(
                (response.status, time.monotonic(), response.getheader("x-request-id") or "")
            )
        except BaseException as exc:
            errors.append(exc)
            all_sent.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(in_flight)]
    for thread in threads:
        thread.start()
    all_sent.wait(timeout=30)
    time.sleep(0.5)  # long enough for the workers to accept every connection
    stopping_at = time.monotonic()
    service.process.send_signal(signal.SIGTERM)

    # New requests after the signal: refused at the door or served, never half-answered.
    late: list[requests.Response | None] = []
    for _ in range(5):
        try:
            late.append(service.post("/embed", json={"text": "late"}, headers=alice.headers))
        except requests.ConnectionError:
            late.append(None)
        time.sleep(0.05)

    for thread in threads:
        thread.join(timeout=90)
    exit_code = service.process.wait(timeout=60)
    exited_at = time.monotonic()

    assert errors == []
    assert [status for status, _, _ in results] == [200] * in_flight
    finished_after_signal = [t for _, t, _ in results if t > stopping_at]
    assert len(finished_after_signal) >= in_flight // 2, (
        "the requests must still be running when the signal arrives, or this proves nothing"
    )
    assert all(r is None or r.status_code == 200 for r in late)
    assert exit_code == 0, service.log()
    # Nothing (the batcher's thread, say) holds a worker past its last request until the
    # graceful timeout (30 s) runs out and the arbiter kills it.
    last_answer = max(t for _, t, _ in results)
    assert exited_at - last_answer < 10
    assert "SIGKILL" not in service.log()
    # Each finished request was also charged and logged, exactly once.
    ids = [rid for _, _, rid in results]
    assert UsageLog.objects.filter(request_id__in=ids, status_code=200).count() == in_flight
    assert "WORKER TIMEOUT" not in service.log()
    assert "Traceback" not in service.log()
