"""Throughput and latency of the service against the model alone, in one run, on one machine.

    .venv/bin/python bench/service.py [--model PATH_OR_ID] [--quantization auto] [--seconds 10]
        [--workload short,sentence] [--database env|sqlite] [--no-baseline] [--ceiling]
        [--ceiling-only] [--ceiling-model minimal|tiny] [--baseline DIR] [--rounds 4] [--profile]

1. In-process `model.encode` at batch 1, 8 and 32, per workload (no HTTP, no identity layer).
2. A real gunicorn with everything switched on (Supabase JWT auth, tenant resolution, rate
   limits, quota, usage log in the database) under 16 concurrent clients sending 1-text /embed
   requests of each workload ("short": search queries of 8-16 words; "sentence": about 30
   tokens), then 32-text /batch-embed requests, with keep-alive connections. The 1-text
   requests, here and below, come from bench/raw_load.py (one thread, requests prebuilt), whose
   own CPU takes little from the server on the same cores.
3. The bare per-request baseline (bench/bare_server.py: gunicorn, 2 sync workers, one `encode`
   per request, no auth, no accounting) under the same clients, in the same run.
4. With --ceiling, the stack's own limit: the same service with a near-free encoder (the minimal
   EmbeddingGemma-architecture model: one small layer) in requests/s, next to the bare server
   answering a constant vector (no model at all), with the load generator's own CPU per
   request printed (it shares the cores). With --baseline DIR, another checkout's service runs
   too; the services take turns in --rounds slices each, in alternating order, so that the
   ratio compares the same moments of the machine.
5. With --profile, py-spy samples the service's workers during the short 1-text run and prints
   the CPU per request by part: HTTP parsing, middleware, DRF, authentication, metering, Redis,
   SQL, tokenization, model, batcher hand-off, rendering, metrics, logging.

Sentences/s, p50/p95/p99 latency and ratios (to in-process batch 32 and to the bare server) are
printed. The database and Redis are DATABASE_URL and REDIS_URL (PostgreSQL and Redis when set),
or with --database sqlite the embedded default: SQLite in a temporary DATA_DIR and a local cache.

Over 400 lines on purpose: `main()` runs the five steps above in order, in one place, so that a
reader can check that every printed ratio compares figures of the same run. The py-spy profiling
lives in bench/cpu_profile.py.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
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

from bench import raw_load  # noqa: E402
from bench.cpu_profile import (  # noqa: E402
    cpu_seconds_by_process,
    profiled,
    thread_cpu_seconds,
    thread_roles,
)
from bench.embedded import use_embedded_default  # noqa: E402
from bench.raw_load import percentile  # noqa: E402

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


def short_queries(count: int, seed: int = 7) -> list[str]:
    """Search-query-like texts of 8 to 16 words."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))) for _ in range(count)]


WORKLOADS: dict[str, Callable[..., list[str]]] = {"short": short_queries, "sentence": sentences}


def in_process(
    model: str, quantization: str, seconds: float, workloads: list[str]
) -> dict[str, dict[str, Any]]:
    from embeddings.encoder import load_encoder

    encoder = load_encoder(
        model_name=model,
        quantization=quantization,
        max_seq_length=2048,
        hf_token=os.environ.get("HF_TOKEN") or None,
    )
    everything = {
        workload: encode_rates(encoder, WORKLOADS[workload](256), seconds) for workload in workloads
    }
    del encoder
    gc.collect()
    return everything


def encode_rates(encoder: Any, texts: list[str], seconds: float) -> dict[str, Any]:
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
    return results


def prepare_tenants(names: list[str]) -> dict[str, str]:
    """Tenants whose limits never get in the way, each with a Supabase-style token."""
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
    tokens = {}
    for number, name in enumerate(names):
        subject = f"00000000-0000-{number:04d}-0000-{os.getpid():012d}"
        email = f"bench-{name}@example.com"
        user = services.provision_supabase_user(subject=subject, email=email)
        tenant = user.personal_tenant
        tenant.plan = plan
        tenant.save(update_fields=["plan"])
        tokens[name] = mint_token(subject=subject, email=email, lifetime_seconds=24 * 3600)
    return tokens


def start_checkout_service(checkout: Path, env: dict[str, str], *, workers: int | None) -> Any:
    """A real gunicorn running `checkout`'s code (tests.service), once /health answers."""
    import tests.service

    tests.service.ROOT = checkout  # the gunicorn process runs that checkout's code
    try:
        service = tests.service.start_service(
            Path(tempfile.mkdtemp(prefix="bench-service-")), env=env, workers=workers, wait=False
        )
    finally:
        tests.service.ROOT = ROOT
    try:
        tests.service.wait_until_healthy(service, timeout=900)  # a busy machine loads slowly
    except BaseException:
        service.stop()
        raise
    return service


def prepare_tenant() -> str:
    """A bench tenant whose limits never get in the way, and a Supabase-style token for it."""
    return prepare_tenants(["bench"])["bench"]


def load(
    url: str,
    token: str,
    *,
    path: str,
    texts_per_request: int,
    clients: int,
    seconds: float,
    workload: str = "sentence",
) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    pool = WORKLOADS[workload](512, seed=11)
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
            body: dict[str, Any] = {"text": chunk[0]} if path == "/embed" else {"texts": chunk}
            started = time.perf_counter()
            connection.request("POST", path, body=json.dumps(body), headers=headers)
            response = connection.getresponse()
            payload = response.read()
            elapsed = time.perf_counter() - started
            timing = raw_load.parse_server_timing(response.getheader("Server-Timing", ""))
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
        "requests_per_s": len(latencies) / wall,
        "requests": len(latencies),
        "failures": failures,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "identity_p50": percentile(identity, 50),
        "latencies": latencies,
        "seconds": wall,
    }


def start_bare(env: dict[str, str], workers: int = 2) -> tuple[subprocess.Popen[bytes], str]:
    """bench/bare_server.py under gunicorn, sync workers; its URL once it answers."""
    from tests.service import free_port

    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            str(workers),
            "-b",
            f"127.0.0.1:{port}",
            "--preload" if env.get("BARE_MODEL") == "free" else "--timeout=120",
            "bench.bare_server:app",
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # a busy machine loads models slowly
    # Each worker loads its model as it boots and only then accepts: once every worker has
    # answered, none is loading any more (which would eat the measured run's CPU).
    answered: set[int] = set()
    while time.monotonic() < deadline and len(answered) < workers:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            connection.request("GET", "/")
            answered.add(json.loads(connection.getresponse().read())["pid"])
            connection.request("POST", "/", body=json.dumps({"text": "warm up"}))
            connection.getresponse().read()
        except OSError:
            time.sleep(0.2)
    if len(answered) == workers:
        return process, url
    process.kill()
    raise RuntimeError("the bare server did not start")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


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
    parser.add_argument("--workload", default="short,sentence", help="short, sentence or both")
    parser.add_argument("--database", choices=["env", "sqlite"], default="env")
    parser.add_argument("--no-baseline", action="store_true", help="skip the bare server")
    parser.add_argument("--no-batch", action="store_true", help="skip the 32-text run")
    parser.add_argument("--ceiling", action="store_true", help="add the near-free-encoder run")
    parser.add_argument(
        "--ceiling-only", action="store_true", help="only the stack ceiling (implies --ceiling)"
    )
    parser.add_argument(
        "--ceiling-model",
        choices=["minimal", "tiny"],
        default="minimal",
        help="the ceiling's EmbeddingGemma-architecture encoder (bench/gemma_builder.py size)",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy CPU breakdown per request")
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="ceiling: slices per service, taking turns (--seconds in all, per service)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. `git archive`) whose stack ceiling runs too, for comparison",
    )
    args = parser.parse_args()
    args.ceiling = args.ceiling or args.ceiling_only
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    workloads = [name.strip() for name in args.workload.split(",") if name.strip()]
    if args.database == "sqlite":
        use_embedded_default("embedplatform-bench-sqlite-")

    print(
        f"model={args.model or 'bundled MiniLM'} quantization={args.quantization} "
        f"cores={len(os.sched_getaffinity(0))} clients={args.clients} "
        f"database={os.environ.get('DATABASE_URL', 'sqlite').split(':')[0]} "
        f"redis={'yes' if os.environ.get('REDIS_URL') else 'no (local cache)'} "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )
    token = prepare_tenant()

    def run_service(model: str, quantization: str, checkout: Path = ROOT) -> Any:
        env = {"MODEL_NAME": model, "MODEL_QUANTIZATION": quantization}
        if args.database == "sqlite":
            env["REDIS_URL"] = ""
        return start_checkout_service(checkout, env, workers=args.workers)

    def one_text(url: str, workload: str, clients: int, seconds: float) -> dict[str, Any]:
        """1-text /embed requests from bench/raw_load.py, whose own CPU takes little from the
        server on the same cores: the runs compare servers (and the in-process model), not
        their clients."""
        host, port = url.removeprefix("http://").split(":")
        requests = raw_load.prebuilt_requests(
            WORKLOADS[workload](512, seed=11), host=host, port=int(port), path="/embed", token=token
        )
        run = raw_load.run(
            url, requests, clients=clients, seconds=seconds, timed_phases=IDENTITY_PHASES
        )
        return {**run, "identity_p50": run["phases_p50"]}

    runs: dict[str, dict[str, Any]] = {}
    profile: list[tuple[str, float]] = []
    bare: dict[str, dict[str, Any]] = {}
    if not args.ceiling_only:
        ceilings = in_process(args.model, args.quantization, args.seconds, workloads)
        for workload, ceiling in ceilings.items():
            print(
                f"\nin-process encode, {workload} ({ceiling['dtype']}, "
                f"~{ceiling['tokens_per_text']:.0f} tokens/text)"
            )
            for batch in (1, 8, 32):
                print(f"  batch {batch:>2}: {ceiling[f'batch{batch}']:8.1f} sentences/s")
        dtype = next(iter(ceilings.values()))["dtype"]

        service = run_service(args.model, args.quantization)
        try:
            health = json.loads(service.get("/health").text)
            for line in service.log().splitlines():
                if '"gunicorn_settings"' in line:
                    sizing = json.loads(line)
                    print(
                        f"\ngunicorn: {sizing['workers']} workers x {sizing['threads']} threads, "
                        f"{sizing['torch_threads']} torch threads each, {sizing['cores']} cores"
                    )
            print(f"service: {health['model']} {health['dtype']}, checks {health['checks']}")
            assert health["dtype"] == dtype, "the service must run the same dtype"
            one_text(service.url, workloads[0], args.clients, 2)  # warm-up
            # One client at a time: the identity layer's own cost, without queueing behind others.
            alone = one_text(service.url, workloads[0], 1, min(args.seconds, 5))
            for workload in workloads:
                if args.profile and workload == "short":
                    profile = profiled(
                        service,
                        lambda w=workload: one_text(service.url, w, args.clients, args.seconds),
                        runs,
                        f"1-text {workload}",
                    )
                else:
                    runs[f"1-text {workload}"] = one_text(
                        service.url, workload, args.clients, args.seconds
                    )
            if not args.no_batch:
                runs["32-text sentence"] = load(
                    service.url,
                    token,
                    path="/batch-embed",
                    texts_per_request=32,
                    clients=args.clients,
                    seconds=args.seconds,
                )
        finally:
            service.stop()

        if not args.no_baseline:
            process, url = start_bare(
                {"BARE_MODEL": args.model, "BARE_QUANTIZATION": args.quantization}
            )
            try:
                # The same warm-up the service had: each new text length costs oneDNN a kernel of
                # its own, seconds in all, which a run of a few seconds must not count.
                one_text(url, workloads[0], args.clients, 2)
                for workload in workloads:
                    bare[workload] = one_text(url, workload, args.clients, args.seconds)
            finally:
                stop(process)

    ceiling_runs: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    ceiling_profiles: dict[str, list[tuple[str, float]]] = {}
    if args.ceiling:
        from bench.gemma_builder import build_gemma_like_model

        encoder_dir = Path(tempfile.mkdtemp(prefix="bench-gemma-ceiling-"))
        encoder = build_gemma_like_model(encoder_dir / "gemma", size=args.ceiling_model)
        checkouts = [("this checkout", ROOT)]
        if args.baseline:
            checkouts.insert(0, ("baseline", args.baseline.resolve()))
        services: dict[str, Any] = {}
        try:
            for label, checkout in checkouts:
                try:
                    services[label] = run_service(str(encoder), "fp32", checkout)
                except RuntimeError as exc:
                    if label == "this checkout":
                        raise
                    # An old checkout may need what this one's venv no longer has (cachetools
                    # for 90c6d66, say): its row says so, and the run's other figures stand.
                    plain = [line for line in str(exc).splitlines() if line[:1] not in "{ "]
                    failures[label] = (plain or ["see its log"])[-1][:200]
            for service in services.values():
                one_text(service.url, "short", args.clients, 2)
            # The services take turns in short slices, in alternating order, so that both
            # sample the same moments of a machine whose speed drifts by +-20% within minutes.
            slices: dict[str, list[dict[str, Any]]] = {label: [] for label in services}
            order = list(services)
            for round_number in range(args.rounds):
                for label in order if round_number % 2 == 0 else order[::-1]:
                    service = services[label]
                    before = cpu_seconds_by_process(service.process.pid)
                    threads_before = thread_cpu_seconds(service.process.pid)
                    run = one_text(service.url, "short", args.clients, args.seconds / args.rounds)
                    threads_after = thread_cpu_seconds(service.process.pid)
                    after = cpu_seconds_by_process(service.process.pid)
                    run["cpu"] = {name: after[name] - before[name] for name in after}
                    run["threads"] = {
                        tid: seconds - threads_before.get(tid, 0.0)
                        for tid, seconds in threads_after.items()
                    }
                    slices[label].append(run)
            for label, runs_of_label in slices.items():
                row = merged(runs_of_label)
                # Named once the rounds are over: request threads start as connections come.
                roles = thread_roles(services[label].process.pid)
                per_role: defaultdict[str, float] = defaultdict(float)
                for tid, us in row["threads_us"].items():
                    per_role[roles.get(tid, "other")] += us
                row["threads_us"] = dict(sorted(per_role.items(), key=lambda item: -item[1]))
                ceiling_runs[f"service, near-free encoder ({label})"] = row
            if args.profile:
                for label, service in services.items():
                    ceiling_profiles[label] = profiled(
                        service,
                        lambda url=service.url: one_text(url, "short", args.clients, 5),
                        {},
                        label,
                    )
        finally:
            for service in services.values():
                service.stop()
            shutil.rmtree(encoder_dir, ignore_errors=True)
        process, url = start_bare({"BARE_MODEL": "free"})
        try:
            ceiling_runs["bare server, no model"] = one_text(
                url, "short", args.clients, args.seconds
            )
        finally:
            stop(process)

    if not args.ceiling_only:
        print_model_runs(
            alone=alone,
            runs=runs,
            bare=bare,
            ceilings=ceilings,
            workloads=workloads,
            clients=args.clients,
            dtype=dtype,
        )
    if ceiling_runs:
        print("\nstack ceiling, 1-text short requests (bench/raw_load.py)")
        print("  (CPU per request, of gunicorn / PostgreSQL / Redis, and of the load generator)")
        for name, run in ceiling_runs.items():
            cpu = run.get("cpu_us")
            costs = (
                f"  CPU {cpu['gunicorn']:.0f} / {cpu['PostgreSQL']:.0f} / {cpu['Redis']:.0f} us"
                if cpu
                else ""
            )
            print(
                f"  {name:<42} {run['requests_per_s']:8.1f} req/s  p50 {run['p50']:.1f} ms  "
                f"p99 {run['p99']:.1f} ms{costs}  (the clients: {run['client_cpu_us']:.0f} us)"
            )
            if run.get("failures"):
                print(f"    {len(run['failures'])} failed requests, first: {run['failures'][0]}")
            if run.get("threads_us"):
                print(
                    "    its workers' threads, us per request: "
                    + ", ".join(
                        f"{role} {us:.0f}" for role, us in run["threads_us"].items() if us >= 1
                    )
                )
        for label, reason in failures.items():
            print(f"  service, near-free encoder ({label}) did not start: {reason}")
        this_run = ceiling_runs["service, near-free encoder (this checkout)"]
        bare_rate = ceiling_runs["bare server, no model"]["requests_per_s"]
        print(
            f"  the bare server is {times(bare_rate, this_run['requests_per_s'])} the metered stack"
        )
        baseline_run = ceiling_runs.get("service, near-free encoder (baseline)")
        if baseline_run is not None:
            per_round = [
                new["requests_per_s"] / old["requests_per_s"]
                for new, old in zip(this_run["rounds"], baseline_run["rounds"], strict=True)
                if old["requests_per_s"] > 0
            ]
            spread = f"{min(per_round):.2f}-{max(per_round):.2f}x" if per_round else "n/a"
            print(
                "  this checkout serves "
                f"{times(this_run['requests_per_s'], baseline_run['requests_per_s'])} the "
                f"baseline's req/s (rounds: {spread}) at "
                f"{times(total_cpu(baseline_run), total_cpu(this_run))} less CPU per request "
                "(gunicorn, PostgreSQL and Redis together)"
            )
    for label, breakdown in ceiling_profiles.items():
        print_breakdown(f"CPU per near-free 1-text short request, {label}", breakdown)
    if profile:
        print_breakdown("CPU per 1-text short request", profile)


def print_model_runs(
    *,
    alone: dict[str, Any],
    runs: dict[str, dict[str, Any]],
    bare: dict[str, dict[str, Any]],
    ceilings: dict[str, dict[str, Any]],
    workloads: list[str],
    clients: int,
    dtype: str,
) -> None:
    print(
        f"\none client, 1-text {workloads[0]} requests: p50 {alone['p50']:.1f} ms, of which the "
        "identity layer (authentication, tenant, rate limits, quota, charge and usage row) "
        f"{alone['identity_p50']:.2f} ms"
    )
    print(f"\nservice under {clients} concurrent clients (identity layer on), {dtype}")
    print(
        f"  {'requests':<18} {'sent/s':>8} {'req/s':>8} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} {'id p50':>7} {'vs batch32':>10} {'vs bare':>8}"
    )
    for name, run in runs.items():
        workload = name.split()[-1]
        ratio = run["sentences_per_s"] / ceilings[workload]["batch32"]
        versus_bare = ""
        if name.startswith("1-text") and workload in bare:
            versus_bare = f"{run['sentences_per_s'] / bare[workload]['sentences_per_s']:7.2f}x"
        print(
            f"  {name:<18} {run['sentences_per_s']:8.1f} {run['requests_per_s']:8.1f} "
            f"{run['p50']:7.1f} {run['p95']:7.1f} {run['p99']:7.1f} {run['identity_p50']:7.2f} "
            f"{ratio:9.0%} {versus_bare:>8}"
        )
        if run["failures"]:
            print(f"    {len(run['failures'])} failed requests, first: {run['failures'][0]}")
    for workload, run in bare.items():
        ratio = run["sentences_per_s"] / ceilings[workload]["batch32"]
        print(
            f"  {'bare ' + workload:<18} {run['sentences_per_s']:8.1f} "
            f"{run['requests_per_s']:8.1f} {run['p50']:7.1f} {run['p95']:7.1f} {run['p99']:7.1f} "
            f"{'':>7} {ratio:9.0%}"
        )
    for workload, run in bare.items():
        # A service with no cost of its own, batching perfectly, would reach in-process batch 32:
        # that bounds "vs bare" whatever the stack does (small where batching gains little).
        bound = ceilings[workload]["batch32"] / run["sentences_per_s"]
        print(f"  the model alone allows at most {bound:.2f}x the bare server on {workload} texts")


def merged(slices: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of several slices of `load`, each with its CPU seconds by process ("cpu") and
    by worker thread id ("threads"): both become microseconds per request."""
    requests = sum(run["requests"] for run in slices)
    by_thread: defaultdict[int, float] = defaultdict(float)
    for run in slices:
        for tid, seconds in run["threads"].items():
            by_thread[tid] += seconds * 1e6 / max(1, requests)
    seconds = sum(run["seconds"] for run in slices)
    latencies = [latency for run in slices for latency in run["latencies"]]
    return {
        "requests": requests,
        "requests_per_s": requests / seconds if seconds > 0 else 0.0,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "failures": [failure for run in slices for failure in run["failures"]],
        "cpu_us": {
            name: sum(run["cpu"][name] for run in slices) * 1e6 / max(1, requests)
            for name in slices[0]["cpu"]
        },
        "threads_us": dict(by_thread),
        "client_cpu_us": sum(run["client_cpu_us"] * run["requests"] for run in slices)
        / max(1, requests),
        "rounds": [{"requests_per_s": run["requests_per_s"]} for run in slices],
    }


def total_cpu(run: dict[str, Any]) -> float:
    return float(sum(run["cpu_us"].values()))


def times(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator > 0 else "n/a"


def print_breakdown(title: str, breakdown: list[tuple[str, float]]) -> None:
    total = sum(value for _, value in breakdown)
    print(f"\n{title} (py-spy, all workers): {total:.0f} us")
    for part, value in breakdown:
        print(f"  {part:<18} {value:8.0f} us  {value / total:5.1%}")


if __name__ == "__main__":
    main()
