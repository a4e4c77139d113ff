"""Soak: mixed traffic from several tenants against a real gunicorn while its dependencies fail.

    nice .venv/bin/python bench/soak.py [--seconds 600] [--workers 2] [--clients-per-tenant 2]

It starts its OWN PostgreSQL (initdb in a temporary folder, as the postgres user when run as
root, on a free port) and its OWN redis-server on a free port, never the machine's shared ones;
migrates, creates four tenants (two on JWTs, one on an API key, one at its limits: a tiny monthly
quota and a low requests-per-minute), and starts gunicorn on them. For `--seconds` it sends small
and large requests and bad input from every tenant, and along the way it

- restarts Redis (at 20% of the run), restarts PostgreSQL (40%),
- sends gunicorn HUP (60%), then SIGTERM and starts it again (80%).

It prints the requests by status, p50/p99 latency by tenant and the workers' RSS, then checks:

- no 5xx other than 503 (documented: a dependency down, a worker stopping, the model busy);
- for every tenant, the tokens of the 200 answers clients received = the served tokens in the
  usage log = the tenant's quota row, and one usage row per 200 (nothing lost, nothing charged
  twice);
- worker RSS bounded (the largest sample under --max-rss-mb).

Exit status 0 when every check holds. tests/test_soak.py runs a one-minute version.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# Run as a script (bench/soak.py), the project root is not on the path yet.
sys.path.insert(0, str(ROOT))

from bench.processes import Gunicorn, PrivatePostgres, PrivateRedis, free_port  # noqa: E402

MODEL = [""]  # the served model's name, read from /health
WORDS = "tenant quota vector model token batch cache worker memory query search latency".split()


@dataclass
class Tenant:
    name: str
    tenant_id: int
    credential: str
    results: list[tuple[str, int | str, float, int, str]] = field(default_factory=list)


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def one_request(
    session: requests.Session, url: str, tenant: Tenant, rng: random.Random
) -> tuple[str, int | str, float, int, str]:
    kind = rng.choices(["small", "large", "openai", "bad_json", "bad_field"], [50, 15, 20, 8, 7])[0]
    headers = {"Authorization": f"Bearer {tenant.credential}"}
    call: tuple[str, dict[str, Any]]
    if kind == "small":
        call = ("/embed", {"json": {"text": text(rng, 12)}})
    elif kind == "large":
        texts = [text(rng, rng.randint(20, 200)) for _ in range(rng.randint(8, 64))]
        call = ("/batch-embed", {"json": {"texts": texts}})
    elif kind == "openai":
        call = (
            "/v1/embeddings",
            {"json": {"input": [text(rng, 30), text(rng, 5)], "model": MODEL[0]}},
        )
    elif kind == "bad_json":
        headers["Content-Type"] = "application/json"
        call = ("/embed", {"data": b'{"text": "unterminated'})
    else:
        call = ("/embed", {"json": {"text": 42, "dimensions": -1}})
    started = time.monotonic()
    try:
        response = session.post(url + call[0], headers=headers, timeout=120, **call[1])
    except requests.RequestException as exc:
        return kind, f"conn:{type(exc).__name__}", time.monotonic() - started, 0, ""
    seconds = time.monotonic() - started
    tokens = 0
    if response.status_code == 200:
        tokens = int(response.json()["usage"]["total_tokens"])
    return kind, response.status_code, seconds, tokens, response.headers.get("x-request-id", "")


def client(url: str, tenant: Tenant, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    session = requests.Session()
    while not stop.is_set():
        result = one_request(session, url, tenant, rng)
        tenant.results.append(result)
        if isinstance(result[1], str) or result[1] in (429, 503):
            time.sleep(0.5)  # back off as a polite client does
            session = requests.Session()


# --- The run ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def setup_django(env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ["DJANGO_SETTINGS_MODULE"] = "embedplatform.settings"
    os.environ["MODEL_LOAD_ON_START"] = "false"
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def make_tenants() -> list[Tenant]:
    from accounts import services
    from accounts.jwt import mint_token
    from accounts.models import Tenant as TenantRow

    made = []
    for name in ("jwt-a", "jwt-b", "key-c", "limited-d"):
        subject = f"soak-{name}-{secrets.token_hex(4)}"
        email = f"{name}@soak.example.com"
        user = services.provision_supabase_user(subject=subject, email=email)
        row = TenantRow.objects.get(personal_owner=user)
        if name == "limited-d":
            row.monthly_token_quota = 3000
            row.requests_per_minute = 30
        else:
            row.requests_per_minute = 100_000
        row.save()
        if name.startswith("key"):
            _, credential = services.create_api_key(tenant=row, name="soak")
        else:
            credential = mint_token(subject=subject, email=email, lifetime_seconds=24 * 3600)
        made.append(Tenant(name=name, tenant_id=row.pk, credential=credential))
    return made


def ledger(tenant: Tenant) -> dict[str, Any]:
    from django.db import close_old_connections
    from django.db.models import Count, Sum

    from accounts.models import QuotaPeriod, UsageLog

    close_old_connections()
    served = [r for r in tenant.results if r[1] == 200]
    rows = UsageLog.objects.filter(tenant_id=tenant.tenant_id, status_code=200)
    by_id = dict(rows.values("request_id").annotate(n=Count("id")).values_list("request_id", "n"))
    return {
        "returned": sum(r[3] for r in served),
        "logged": rows.aggregate(t=Sum("tokens"))["t"] or 0,
        "quota": QuotaPeriod.objects.filter(tenant_id=tenant.tenant_id).aggregate(t=Sum("tokens"))[
            "t"
        ]
        or 0,
        "answers_200": len(served),
        "rows_200": sum(by_id.values()),
        "double_charged": sum(1 for n in by_id.values() if n > 1),
        "served_without_row": sum(1 for r in served if by_id.get(r[4], 0) == 0),
    }


def run(seconds: float, workers: int, clients_per_tenant: int, max_rss_mb: float) -> bool:
    base = Path(tempfile.mkdtemp(prefix="embedplatform-soak-"))
    postgres, redis = PrivatePostgres(base), PrivateRedis(base)
    service: Gunicorn | None = None
    try:
        postgres.start()
        redis.start()
        env = {
            **os.environ,
            "DATABASE_URL": postgres.url,
            "REDIS_URL": redis.url,
            "DATA_DIR": str(base / "data"),
            "SECRET_KEY": secrets.token_urlsafe(32),
            "SUPABASE_JWT_SECRET": secrets.token_urlsafe(32),
            "CACHE_KEY_PREFIX": "soak",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "PORT": str(free_port()),
            "WEB_CONCURRENCY": str(workers),
            "PROMETHEUS_MULTIPROC_DIR": str(base / "metrics"),
            "MODEL_QUANTIZATION": os.environ.get("MODEL_QUANTIZATION", "fp32"),
            "AUTH_CACHE_SECONDS": "5",
        }
        env.pop("DJANGO_SETTINGS_MODULE", None)
        env["GUNICORN_BIND"] = f"127.0.0.1:{env['PORT']}"
        (base / "metrics").mkdir()
        subprocess.run(
            [PYTHON, "manage.py", "migrate", "--noinput"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
        setup_django(
            {
                k: env[k]
                for k in (
                    "DATABASE_URL",
                    "REDIS_URL",
                    "DATA_DIR",
                    "SECRET_KEY",
                    "SUPABASE_JWT_SECRET",
                    "CACHE_KEY_PREFIX",
                )
            }
        )
        tenants = make_tenants()
        env["MODEL_LOAD_ON_START"] = "true"
        service = Gunicorn(env, base / "gunicorn.log")
        service.start()
        MODEL[0] = requests.get(service.url + "/health", timeout=10).json()["model"]
        print(
            f"soak: {seconds:.0f}s, {workers} workers, {len(tenants)} tenants x "
            f"{clients_per_tenant} clients; postgres :{postgres.port}, redis :{redis.port}, "
            f"gunicorn :{service.port}",
            flush=True,
        )

        stop = threading.Event()
        threads = [
            threading.Thread(target=client, args=(service.url, t, stop, i * 100 + j), daemon=True)
            for i, t in enumerate(tenants)
            for j in range(clients_per_tenant)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()

        def stop_and_start_gunicorn() -> None:
            service.stop()
            service.start()

        events = [
            (0.2, "restart redis", redis.restart),
            (0.4, "restart postgresql", postgres.restart),
            (0.6, "gunicorn HUP", lambda: service.signal(signal.SIGHUP)),
            (0.8, "gunicorn SIGTERM + start", stop_and_start_gunicorn),
        ]
        rss: list[float] = []
        done = []
        while (elapsed := time.monotonic() - started) < seconds:
            for at, name, action in events:
                if name not in done and elapsed >= at * seconds:
                    done.append(name)
                    t0 = time.monotonic()
                    action()
                    print(f"  {elapsed:6.1f}s {name} ({time.monotonic() - t0:.1f}s)", flush=True)
            rss.extend(service.worker_rss_mb())
            time.sleep(2)
        stop.set()
        for thread in threads:
            thread.join(timeout=150)
        exit_code = service.stop()
        log = service.log_path.read_text(errors="replace")
        return report(tenants, rss, max_rss_mb, exit_code, log)
    finally:
        if service is not None:
            service.stop()
        redis.stop()
        postgres.stop()
        shutil.rmtree(base, ignore_errors=True)


def report(
    tenants: list[Tenant], rss: list[float], max_rss_mb: float, exit_code: int, log: str
) -> bool:
    ok = True
    statuses: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    for tenant in tenants:
        for kind, status, *_ in tenant.results:
            statuses[str(status)] += 1
            by_kind[kind][str(status)] += 1
    total = sum(statuses.values())
    print(f"\nrequests: {total}")
    for status, count in sorted(statuses.items()):
        print(f"  {status:>28}: {count}")
    print("by kind: " + json.dumps({k: dict(v) for k, v in sorted(by_kind.items())}))
    print("\nlatency of answered requests, seconds   p50     p99     n")
    for tenant in tenants:
        latencies = [r[2] for r in tenant.results if isinstance(r[1], int)]
        print(
            f"  {tenant.name:<36} {percentile(latencies, 0.5):6.3f}  "
            f"{percentile(latencies, 0.99):6.3f}  {len(latencies)}"
        )
    bad_5xx = {s: n for s, n in statuses.items() if s.isdigit() and int(s) >= 500 and s != "503"}
    if bad_5xx:
        ok = False
        print(f"FAIL: 5xx other than 503: {bad_5xx}")
    print("\nledger (tokens): returned to clients / usage log / quota row; 200s / rows")
    for tenant in tenants:
        book = ledger(tenant)
        print(f"  {tenant.name:<12} {book}")
        balanced = (
            book["returned"] == book["logged"] == book["quota"]
            and book["answers_200"] == book["rows_200"]
            and book["double_charged"] == 0
            and book["served_without_row"] == 0
        )
        if not balanced:
            ok = False
            print(f"FAIL: {tenant.name}'s ledger does not balance")
    peak = max(rss, default=0.0)
    print(
        f"\nworker RSS MB: first {rss[0] if rss else 0:.0f}, peak {peak:.0f}, "
        f"last {rss[-1] if rss else 0:.0f} (limit {max_rss_mb:.0f})"
    )
    if peak > max_rss_mb:
        ok = False
        print("FAIL: worker RSS over the limit")
    tracebacks = log.count("Traceback")
    print(f"gunicorn exit status {exit_code}; tracebacks in the log: {tracebacks}")
    if tracebacks:
        ok = False
        print("FAIL: tracebacks in the log")
    print("\nsoak: " + ("PASS" if ok else "FAIL"))
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients-per-tenant", type=int, default=2)
    parser.add_argument("--max-rss-mb", type=float, default=2500)
    args = parser.parse_args()
    sys.exit(0 if run(args.seconds, args.workers, args.clients_per_tenant, args.max_rss_mb) else 1)


if __name__ == "__main__":
    main()
