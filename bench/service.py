"""Throughput and latency of the service against the model alone, in one run, on one machine.

    .venv/bin/python bench/service.py [--model PATH_OR_ID] [--quantization auto] [--seconds 10]

1. In-process `model.encode` at batch 1, 8 and 32 (the ceiling: no HTTP, no identity layer).
2. A real gunicorn with everything switched on (Supabase JWT auth, tenant resolution, Redis rate
   limits, quota, usage log in the database) under 16 concurrent clients sending 1-text /embed
   requests, then 32-text /batch-embed requests, with keep-alive connections.
3. Sentences/s, p50/p95/p99 latency, the ratios to in-process batch 32, and the identity
   layer's own p50 per request, read from each response's Server-Timing header.

The database and Redis are DATABASE_URL and REDIS_URL (PostgreSQL and Redis when set, else the
embedded SQLite and a local cache). Floors (issue 2): 1-text >= 50%, 32-text >= 85%.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "embedplatform.settings")
os.environ.setdefault("DATA_DIR", tempfile.mkdtemp(prefix="embedplatform-bench-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["MODEL_LOAD_ON_START"] = "false"
os.environ.setdefault("CACHE_KEY_PREFIX", f"bench-{os.getpid()}")

WORDS = (
    "embedding service tenants quota latency throughput model vector search query document "
    "cluster semantic similarity language korean english token batch request server cache "
    "database worker thread core memory precision matrix attention layer pooling normalize"
).split()

IDENTITY_PHASES = ("auth", "ratelimit", "quota", "charge")


def sentences(count: int, words: int = 24, seed: int = 7) -> list[str]:
    """Varied sentences of about 32 tokens each (MiniLM's WordPiece, special tokens included)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def in_process(model: str, quantization: str, seconds: float) -> dict[str, Any]:
    from embeddings.runtime import load_encoder

    encoder = load_encoder(
        model_name=model,
        quantization=quantization,
        max_seq_length=2048,
        hf_token=os.environ.get("HF_TOKEN") or None,
    )
    texts = sentences(256)
    tokens = encoder.count_tokens(texts[:32], "")
    results: dict[str, Any] = {
        "dtype": encoder.dtype,
        "name": encoder.name,
        "tokens_per_text": statistics.mean(tokens),
    }
    for batch in (1, 8, 32):
        encoder.model.encode(texts[:batch], batch_size=batch)  # warm-up
        done, started, offset = 0, time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            chunk = [texts[(offset + i) % len(texts)] for i in range(batch)]
            encoder.model.encode(chunk, batch_size=batch, show_progress_bar=False)
            done += batch
            offset += batch
        results[f"batch{batch}"] = done / (time.perf_counter() - started)
    del encoder
    gc.collect()
    return results


def prepare_tenant() -> str:
    """A bench tenant whose limits never get in the way, and a Supabase-style token for it."""
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from accounts import services
    from accounts.jwt import mint_token
    from accounts.models import Plan

    plan, _ = Plan.objects.get_or_create(
        name="bench",
        defaults={
            "requests_per_minute": 10**8,
            "tokens_per_minute": 10**12,
            "monthly_token_quota": 10**15,
            "max_texts_per_request": 256,
        },
    )
    subject = f"00000000-0000-0000-0000-{os.getpid():012d}"
    user = services.provision_supabase_user(subject=subject, email="bench@example.com")
    tenant = user.personal_tenant
    tenant.plan = plan
    tenant.save(update_fields=["plan"])
    return mint_token(subject=subject, email="bench@example.com", lifetime_seconds=24 * 3600)


def load(
    url: str, token: str, *, path: str, texts_per_request: int, clients: int, seconds: float
) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    pool = sentences(512, seed=11)
    latencies: list[float] = []
    identity: list[float] = []
    failures: list[str] = []
    done = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(number: int) -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        offset = number * 37
        while time.perf_counter() < deadline:
            chunk = [pool[(offset + i) % len(pool)] for i in range(texts_per_request)]
            offset += texts_per_request
            body = {"text": chunk[0]} if path == "/embed" else {"texts": chunk}
            started = time.perf_counter()
            connection.request("POST", path, body=json.dumps(body), headers=headers)
            response = connection.getresponse()
            payload = response.read()
            elapsed = time.perf_counter() - started
            timing = parse_server_timing(response.getheader("Server-Timing", ""))
            with lock:
                if response.status != 200:
                    failures.append(f"{response.status} {payload[:200]!r}")
                    continue
                latencies.append(elapsed * 1000)
                identity.append(sum(timing.get(phase, 0.0) for phase in IDENTITY_PHASES))
                done[0] += texts_per_request
        connection.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "sentences_per_s": done[0] / wall,
        "requests": len(latencies),
        "failures": failures,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "identity_p50": percentile(identity, 50),
    }


def parse_server_timing(header: str) -> dict[str, float]:
    phases = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        if duration:
            phases[name] = float(duration)
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default=os.environ.get("MODEL_NAME", ""))
    parser.add_argument("--quantization", default=os.environ.get("MODEL_QUANTIZATION", "auto"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--workers", type=int, default=None, help="default: gunicorn.conf.py's for this machine"
    )
    args = parser.parse_args()

    print(
        f"model={args.model or 'bundled MiniLM'} quantization={args.quantization} "
        f"cores={len(os.sched_getaffinity(0))} clients={args.clients}"
    )
    ceiling = in_process(args.model, args.quantization, args.seconds)
    print(
        f"\nin-process encode ({ceiling['dtype']}, ~{ceiling['tokens_per_text']:.0f} tokens/text)"
    )
    for batch in (1, 8, 32):
        print(f"  batch {batch:>2}: {ceiling[f'batch{batch}']:8.1f} sentences/s")

    token = prepare_tenant()
    from tests.service import start_service

    env = {"MODEL_NAME": args.model, "MODEL_QUANTIZATION": args.quantization}
    service = start_service(
        Path(tempfile.mkdtemp(prefix="bench-service-")), env=env, workers=args.workers
    )
    try:
        health = json.loads(service.get("/health").text)
        for line in service.log().splitlines():
            if '"gunicorn_settings"' in line:
                sizing = json.loads(line)
                print(
                    f"gunicorn: {sizing['workers']} workers x {sizing['threads']} threads, "
                    f"{sizing['torch_threads']} torch threads each, {sizing['cores']} cores"
                )
        print(f"\nservice: {health['model']} {health['dtype']}, checks {health['checks']}")
        assert health["dtype"] == ceiling["dtype"], "the service must run the same dtype"
        load(
            service.url, token, path="/embed", texts_per_request=1, clients=args.clients, seconds=2
        )
        # One client at a time: the identity layer's own cost, without queueing behind others.
        alone = load(
            service.url,
            token,
            path="/embed",
            texts_per_request=1,
            clients=1,
            seconds=min(args.seconds, 5),
        )
        runs = {
            "1-text": load(
                service.url,
                token,
                path="/embed",
                texts_per_request=1,
                clients=args.clients,
                seconds=args.seconds,
            ),
            "32-text": load(
                service.url,
                token,
                path="/batch-embed",
                texts_per_request=32,
                clients=args.clients,
                seconds=args.seconds,
            ),
        }
    finally:
        service.stop()

    print(
        f"\none client, 1-text requests: p50 {alone['p50']:.1f} ms, of which the identity layer "
        "(authentication, tenant, rate limits, quota, charge and usage row) "
        f"{alone['identity_p50']:.2f} ms"
    )
    floors = {"1-text": 0.50, "32-text": 0.85}
    print(f"\nservice under {args.clients} concurrent clients (identity layer on)")
    print(
        f"  {'requests':<9} {'sent/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'identity p50 ms':>16} {'vs batch32':>10} {'floor':>6}"
    )
    for name, run in runs.items():
        ratio = run["sentences_per_s"] / ceiling["batch32"]
        verdict = "ok" if ratio >= floors[name] else "BELOW"
        print(
            f"  {name:<9} {run['sentences_per_s']:8.1f} {run['p50']:8.1f} {run['p95']:8.1f} "
            f"{run['p99']:8.1f} {run['identity_p50']:16.2f} {ratio:9.0%} {floors[name]:5.0%} "
            f"{verdict}"
        )
        if run["failures"]:
            print(f"    {len(run['failures'])} failed requests, first: {run['failures'][0]}")


if __name__ == "__main__":
    main()
