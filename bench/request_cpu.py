"""CPU per request, by step of the metered path, measured in-process with each thread's own clock.

    .venv/bin/python bench/request_cpu.py [--model PATH_OR_ID] [--requests 2000]
        [--endpoint /v1/embeddings] [--database env|sqlite] [--clients 1]

Request threads (one by default) send 1-text short queries straight to the WSGI application
(no gunicorn, no sockets), so each step's thread CPU is read without sampling: every step below
is wrapped in a `time.thread_time()` pair. py-spy (`bench/service.py --profile`) samples wall
time, which counts a thread blocked on Redis, PostgreSQL or the model as busy; this counts only
what a step costs the CPU.

The request thread's steps nest as printed; "rest of ..." is what the listed children do not
cover. Below them: the worker's other threads (the batcher, which runs the model; the charge
writer) and the server processes, per request, read from /proc: the PostgreSQL backends of the
bench's database (clients of other databases do not count) and Redis (all of it: run it on a
quiet machine). With `--database sqlite` the cache is the local one and there are no servers.
The "(cache)" steps are the rate-limit windows in Redis, or the local cache: a 1-text request
counts against both in one round trip once its tokens are known ("both windows"); the two
separate steps are for requests counted on arrival. One client's charges each get a
transaction of their own; with `--clients 16` they share them (group commit), which is where
the charge writer and PostgreSQL cost less per request.

The default model is the minimal EmbeddingGemma-architecture model (one small layer: almost no
model work), as in `bench/service.py --ceiling`: what is left is the stack's own cost.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cpu_profile import cpu_seconds, cpu_seconds_by_process, stat_fields  # noqa: E402
from bench.embedded import use_embedded_default  # noqa: E402

# (label, module, owner(s) inside the module ("A|B") or "" for the module, attribute, parent)
STEPS: list[tuple[str, str, str, str, str]] = [
    ("view", "embeddings.views", "MeteredEmbedView", "dispatch", "request"),
    ("authentication, permissions", "accounts.metering.views", "MeteredAPIView", "initial", "view"),
    (
        "Supabase JWT",
        "accounts.authentication",
        "SupabaseJWTAuthentication",
        "authenticate",
        "authentication, permissions",
    ),
    (
        "requests per minute (cache)",
        "accounts.ratelimit",
        "",
        "count_request",
        "authentication, permissions",
    ),
    ("handler", "embeddings.views", "MeteredEmbedView", "post", "view"),
    (
        "body parsing (JSON)",
        "rest_framework.request",
        "Request",
        "_load_data_and_files",
        "handler",
    ),
    (
        "validation (serializer)",
        "rest_framework.serializers",
        "BaseSerializer",
        "is_valid",
        "handler",
    ),
    ("tokenization", "embeddings.runtime", "Runtime", "tokenize", "handler"),
    ("tokens per minute (cache)", "accounts.ratelimit", "", "consume_tokens", "handler"),
    (
        "both windows, one round trip (cache)",
        "accounts.ratelimit",
        "",
        "count_request_with_tokens",
        "handler",
    ),
    ("quota pre-check", "accounts.metering.ledger", "", "check_quota", "handler"),
    ("batcher hand-off", "embeddings.runtime", "Runtime", "submit", "handler"),
    (
        "model and charge, one wait",
        "accounts.metering.meter",
        "Meter",
        "served_when_done",
        "handler",
    ),
    (
        "charge settled (alone where its group charged nothing)",
        "accounts.metering.ledger",
        "ChargeAfterModel",
        "settle",
        "model and charge, one wait",
    ),
    ("served: charge, metrics", "accounts.metering.meter", "Meter", "served", "handler"),
    (
        "charge and usage row (SQL)",
        "accounts.metering.ledger",
        "",
        "charge_and_log",
        "served: charge, metrics",
    ),
    ("input decoding", "embeddings.views", "EmbedView|OpenAIEmbeddingsView", "texts", "handler"),
    ("response body", "embeddings.views", "EmbedView|OpenAIEmbeddingsView", "render", "handler"),
    ("finish (headers, metrics)", "accounts.metering.meter", "Meter", "finish", "view"),
    ("rendering (JSON)", "embeddings.renderers", "VectorJSONRenderer", "render", "request"),
]


@dataclass
class Clock:
    """Thread CPU seconds spent inside one wrapped callable, over all its calls."""

    seconds: float = 0.0
    calls: int = 0
    local: threading.local = field(default_factory=threading.local)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            # Re-entrant calls (a subclass calling its parent's method) count once.
            depth = getattr(self.local, "depth", 0)
            self.local.depth = depth + 1
            started = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.local.depth = depth
                if depth == 0:
                    spent = time.thread_time() - started
                    with self.lock:  # request threads of --clients share the clock
                        self.seconds += spent
                        self.calls += 1

        return timed


def install_clocks() -> dict[str, Clock]:
    import importlib

    clocks: dict[str, Clock] = {}
    for label, module_name, owner_name, attribute, _parent in STEPS:
        module = importlib.import_module(module_name)
        clock = clocks[label] = Clock()
        for owner in (
            [getattr(module, name) for name in owner_name.split("|")] if owner_name else [module]
        ):
            setattr(owner, attribute, clock.wrap(getattr(owner, attribute)))
    return clocks


def thread_cpu_by_name() -> dict[str, float]:
    """CPU seconds of this process's threads, by thread name."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    totals: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            seconds = cpu_seconds(stat_fields(f"/proc/self/task/{tid}/stat"))
        except OSError:  # ended meanwhile
            continue
        name = names.get(int(tid), "other")
        totals[name] = totals.get(name, 0.0) + seconds
    return totals


def backend_cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of the PostgreSQL backends serving this bench's database (the request
    thread's, the charge writer's; other databases' clients, a test run say, do not count) and
    of the Redis server."""
    from django.db import connection

    totals = {"PostgreSQL": 0.0, "Redis": cpu_seconds_by_process(gunicorn_pid=-1)["Redis"]}
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            pids = [row[0] for row in cursor.fetchall()]
        for pid in pids:
            try:
                totals["PostgreSQL"] += cpu_seconds(stat_fields(f"/proc/{pid}/stat"))
            except OSError:  # ended meanwhile
                continue
    return totals


def batch_passes() -> tuple[float, float]:
    """(forward passes, texts in them) so far, from the batch-size histogram."""
    from embedplatform import metrics

    samples = next(iter(metrics.BATCH_SIZE.collect())).samples
    count = next(sample.value for sample in samples if sample.name.endswith("_count"))
    total = next(sample.value for sample in samples if sample.name.endswith("_sum"))
    return count, total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="", help="default: the minimal Gemma-architecture model")
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument(
        "--endpoint", default="/v1/embeddings", choices=["/v1/embeddings", "/embed"]
    )
    parser.add_argument("--database", choices=["env", "sqlite"], default="env")
    parser.add_argument(
        "--clients",
        type=int,
        default=1,
        help="request threads at once (charges then share transactions: group commit)",
    )
    args = parser.parse_args()

    if args.database == "sqlite":
        use_embedded_default("embedplatform-request-cpu-")
    # Imported here: bench.service sets up the environment (offline, no model at start).
    from bench.gemma_builder import build_gemma_like_model
    from bench.service import WORKLOADS, prepare_tenant

    model = args.model or str(
        build_gemma_like_model(
            Path(tempfile.mkdtemp(prefix="request-cpu-")) / "gemma-minimal", size="minimal"
        )
    )
    os.environ["MODEL_NAME"] = model
    os.environ["MODEL_QUANTIZATION"] = args.quantization
    os.environ.setdefault("TORCH_THREADS", "1")  # as each gunicorn worker on 2 cores
    os.environ.setdefault("LOG_LEVEL", "warning")
    token = prepare_tenant()

    from django.db import connections

    from embeddings.runtime import ensure_loaded
    from embedplatform.wsgi import application  # what gunicorn serves

    runtime = ensure_loaded()
    clocks = install_clocks()
    texts = WORKLOADS["short"](512, seed=5)

    def request(number: int) -> None:
        text = texts[number % len(texts)]
        payload = {"input": text} if args.endpoint == "/v1/embeddings" else {"text": text}
        body = json.dumps(payload).encode()
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": args.endpoint,
            "SERVER_NAME": "localhost",
            "SERVER_PORT": "8000",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "HTTP_HOST": "localhost",
            "REMOTE_ADDR": "127.0.0.1",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(body)),
            "HTTP_AUTHORIZATION": f"Bearer {token}",
            "wsgi.input": io.BytesIO(body),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
        }
        statuses: list[str] = []

        def start_response(status: str, headers: Any, *_: Any) -> Callable[[bytes], object]:
            statuses.append(status)
            return lambda _data: None

        result = application(environ, start_response)
        b"".join(result)
        getattr(result, "close", lambda: None)()
        if not statuses[0].startswith("200"):
            raise SystemExit(f"{args.endpoint} answered {statuses[0]}")

    for number in range(max(50, args.requests // 10)):  # warm up caches, connections, the graph
        request(number)
    for clock in clocks.values():
        clock.seconds, clock.calls = 0.0, 0
    passes_before = batch_passes()
    servers_before = backend_cpu_seconds()
    threads_before = thread_cpu_by_name()
    request_cpu = 0.0
    totals_lock = threading.Lock()

    def client(first: int) -> None:
        nonlocal request_cpu
        started = time.thread_time()
        for number in range(first, args.requests, args.clients):
            request(number)
        spent = time.thread_time() - started
        with totals_lock:
            request_cpu += spent
        connections.close_all()  # this thread's own (the request threads of a worker keep theirs)

    started_wall = time.perf_counter()
    clients = [threading.Thread(target=client, args=(first,)) for first in range(args.clients)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    wall = time.perf_counter() - started_wall
    threads_after = thread_cpu_by_name()
    servers_after = backend_cpu_seconds()
    passes_after = batch_passes()

    count = args.requests

    def us(seconds: float) -> str:
        return f"{seconds * 1e6 / count:8.1f}"

    print(
        f"model={runtime.encoder.name} quantization={args.quantization} "
        f"endpoint={args.endpoint} database={os.environ.get('DATABASE_URL', '').split(':')[0]} "
        f"requests={count}, clients={args.clients}: {count / wall:.0f} requests/s"
    )
    print("\nCPU per request, us (the request thread's steps nest as indented)")
    totals = {"request": request_cpu, **{label: clock.seconds for label, clock in clocks.items()}}
    children: dict[str, list[str]] = {}
    for label, *_rest, parent in STEPS:
        children.setdefault(parent, []).append(label)

    def show(label: str, depth: int) -> None:
        print(f"  {us(totals[label])}  {'  ' * depth}{label}")
        kids = children.get(label, [])
        for kid in kids:
            show(kid, depth + 1)
        if kids:
            rest = totals[label] - sum(totals[kid] for kid in kids)
            what = "HTTP handler, middleware" if label == "request" else label
            print(f"  {us(rest)}  {'  ' * (depth + 1)}rest of {what}")

    show("request", 0)
    # The request threads have ended by now (their CPU is above); the main thread only waited.
    other_threads = {
        name: threads_after.get(name, 0.0) - threads_before.get(name, 0.0)
        for name in threads_after
        if name != "MainThread"
    }
    passes = passes_after[0] - passes_before[0]
    texts_per_pass = (passes_after[1] - passes_before[1]) / max(1, passes)
    print(
        f"\nother threads of the worker, us per request "
        f"({passes:.0f} model passes of {texts_per_pass:.1f} texts)"
    )
    for name, seconds in sorted(other_threads.items(), key=lambda item: -item[1]):
        if seconds > 0:
            print(f"  {us(seconds)}  {name}")
    print("\nserver processes, us per request")
    for name in ("PostgreSQL", "Redis"):
        if servers_after[name] > 0:
            print(f"  {us(servers_after[name] - servers_before[name])}  {name}")


if __name__ == "__main__":
    main()
