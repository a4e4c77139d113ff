"""Fair scheduling between tenants, against a real gunicorn, in one run.

    .venv/bin/python bench/fairness.py [--baseline DIR] [--seconds 20] [--quantization auto]

For this checkout (and, with --baseline, another checkout of the project, e.g. `git archive main`
unpacked in a folder, started the same way in the same run):

1. tenant B alone: 1-text /embed requests one after the other (its latency with an idle model);
2. tenant A keeps `--a-clients` 256-text /batch-embed requests of long texts (MiniLM's 256-token
   limit) in flight without a pause, while B sends the same 1-text requests: B's p50/p99/max,
   and how A's requests ended (200, or 429/503 refusals with Retry-After);
3. 16 clients of one tenant sending 32-text /batch-embed requests: sentences/s, the cross-request
   batching throughput that fairness must not cost, the two servers taking turns (`--rounds`).

The machine is shared and noisy: compare figures of one run, not across runs. Target (issue 7):
B's p99 under about 1 s during A's stream, and 32-text throughput within 5% of the baseline.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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

from bench.service import load as throughput  # noqa: E402
from bench.service import percentile, prepare_tenants, sentences  # noqa: E402


@contextmanager
def serving(checkout: Path, env: dict[str, str], workers: int | None) -> Iterator[Any]:
    """gunicorn started from `checkout` (this one or a baseline), stopped afterwards."""
    import tests.service

    original = tests.service.ROOT
    tests.service.ROOT = checkout  # the process runs that checkout's code
    try:
        service = tests.service.start_service(
            Path(tempfile.mkdtemp(prefix="bench-fairness-")), env=env, workers=workers
        )
    finally:
        tests.service.ROOT = original
    try:
        yield service
    finally:
        service.stop()


class Client:
    def __init__(self, url: str, token: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=300)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, float, dict[str, str]]:
        started = time.perf_counter()
        self.connection.request("POST", path, body=json.dumps(body), headers=self.headers)
        response = self.connection.getresponse()
        response.read()
        return response.status, time.perf_counter() - started, dict(response.getheaders())


def one_text_latencies(
    url: str, token: str, seconds: float, stop: threading.Event | None = None
) -> tuple[list[float], collections.Counter[int]]:
    client = Client(url, token)
    pool = sentences(64, words=12, seed=3)
    latencies: list[float] = []
    statuses: collections.Counter[int] = collections.Counter()
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline and not (stop and stop.is_set()):
        status, elapsed, _ = client.post("/embed", {"text": pool[n % len(pool)]})
        statuses[status] += 1
        if status == 200:
            latencies.append(elapsed)
        n += 1
        time.sleep(0.05)
    return latencies, statuses


def large_stream(
    url: str, token: str, stop: threading.Event, results: list[tuple[int, float, str]]
) -> None:
    client = Client(url, token)
    texts = sentences(256, words=230, seed=5)  # each past MiniLM's 256-token limit
    while not stop.is_set():
        status, elapsed, headers = client.post("/batch-embed", {"texts": texts})
        results.append((status, elapsed, headers.get("Retry-After", "")))
        if status != 200:
            time.sleep(float(headers.get("Retry-After") or 1))


def measure(url: str, tokens: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    idle, _ = one_text_latencies(url, tokens["b"], seconds=min(args.seconds, 10))
    stop = threading.Event()
    a_results: list[tuple[int, float, str]] = []
    streams = [
        threading.Thread(target=large_stream, args=(url, tokens["a"], stop, a_results))
        for _ in range(args.a_clients)
    ]
    for thread in streams:
        thread.start()
    time.sleep(2)  # A's stream is running before B starts
    loaded, b_statuses = one_text_latencies(url, tokens["b"], seconds=args.seconds)
    stop.set()
    for thread in streams:
        thread.join()
    return {
        "idle_p50": percentile(idle, 50),
        "idle_p99": percentile(idle, 99),
        "b_p50": percentile(loaded, 50),
        "b_p99": percentile(loaded, 99),
        "b_max": max(loaded, default=float("nan")),
        "b_requests": len(loaded),
        "b_statuses": dict(b_statuses),
        "a_statuses": dict(collections.Counter(status for status, _, _ in a_results)),
        "a_p50": percentile([e for s, e, _ in a_results if s == 200], 50),
        "a_retry_after": sorted({r for s, _, r in a_results if s != 200 and r}),
    }


def scheduler_only(baseline: Path | None, seconds: float) -> None:
    """The batchers alone, in this process, with a model that sleeps 2 ms + 0.1 ms per padded
    token per pass (about MiniLM's pace on one core): what the scheduling itself costs or gains,
    without the machine's noise in the model."""
    import importlib.util

    import django
    import numpy as np

    django.setup()
    from embeddings.batching import Batcher

    batchers: dict[str, type[Any]] = {"this checkout": Batcher}
    if baseline:
        spec = importlib.util.spec_from_file_location(
            "baseline_batching", baseline / "embeddings" / "batching.py"
        )
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        batchers = {"baseline": module.Batcher, **batchers}

    def model(inputs: list[Any], prompt: str) -> np.ndarray:
        padded = len(inputs) * max(count for _, count in inputs)
        time.sleep(0.002 + 0.0001 * padded)
        return np.zeros((len(inputs), 4), np.float32)

    def make(klass: type[Any]) -> Any:
        return klass(model, max_batch_size=32, max_batch_tokens=4096, wait_seconds=0.002)

    def submit(batcher: Any, count: int, tokens: int, key: str) -> Any:
        inputs = [(i, tokens) for i in range(count)]
        options = {"key": key} if "key" in batcher.submit.__code__.co_varnames else {}
        return batcher.submit(inputs, prompt="", token_counts=[tokens] * count, **options)

    print(f"\nscheduler only (simulated model), {seconds:.0f} s each:")
    for name, klass in batchers.items():
        batcher = make(klass)
        done = [0]
        deadline = time.perf_counter() + seconds

        def client(
            batcher: Any = batcher, done: list[int] = done, deadline: float = deadline
        ) -> None:
            while time.perf_counter() < deadline:
                submit(batcher, 32, 34, "c").result()
                done[0] += 32

        threads = [threading.Thread(target=client) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rate = done[0] / seconds
        # B's 1-text requests while A's 256-text requests of 256-token texts keep coming.
        stop = threading.Event()

        def stream(batcher: Any = batcher, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                try:
                    submit(batcher, 256, 256, "a").result()
                except Exception:  # refused: A's share of the queue is taken; retry shortly
                    time.sleep(0.2)

        streams = [threading.Thread(target=stream) for _ in range(2)]
        for thread in streams:
            thread.start()
        time.sleep(0.5)
        waits = []
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            started = time.perf_counter()
            submit(batcher, 1, 12, "b").result()
            waits.append(time.perf_counter() - started)
            time.sleep(0.05)
        stop.set()
        for thread in streams:
            thread.join()
        batcher.close()
        print(
            f"  {name:<14} 16 clients x 32 texts: {rate:7.1f} texts/s; B's 1 text during A's "
            f"stream: p50 {percentile(waits, 50) * 1000:.0f} ms, "
            f"p99 {percentile(waits, 99) * 1000:.0f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--quantization", default=os.environ.get("MODEL_QUANTIZATION", "auto"))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--a-clients", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--scheduler-only", action="store_true", help="only the batchers, with a simulated model"
    )
    args = parser.parse_args()
    if args.scheduler_only:
        scheduler_only(args.baseline.resolve() if args.baseline else None, args.seconds)
        return

    tokens = prepare_tenants(["a", "b", "c"])
    env = {"MODEL_NAME": "", "MODEL_QUANTIZATION": args.quantization}
    targets = [("this checkout", ROOT)]
    if args.baseline:
        targets.insert(0, ("baseline", args.baseline.resolve()))
    print(
        f"MiniLM, quantization={args.quantization}, cores={len(os.sched_getaffinity(0))}, "
        f"{args.a_clients} streams of 256 long texts from tenant A, {args.seconds:.0f} s phases "
        "(shared, noisy machine: compare within this run)"
    )
    results: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        urls = {
            name: stack.enter_context(serving(checkout, env, args.workers)).url
            for name, checkout in targets
        }
        for name, checkout in targets:
            results[name] = r = measure(urls[name], tokens, args)
            print(f"\n{name} ({checkout})")
            print(
                f"  B alone, 1 text:        p50 {r['idle_p50'] * 1000:7.0f} ms  "
                f"p99 {r['idle_p99'] * 1000:7.0f} ms"
            )
            print(
                f"  B during A's stream:    p50 {r['b_p50'] * 1000:7.0f} ms  "
                f"p99 {r['b_p99'] * 1000:7.0f} ms  max {r['b_max'] * 1000:7.0f} ms  "
                f"({r['b_requests']} requests, statuses {r['b_statuses']})"
            )
            print(
                f"  A's 256-text requests:  statuses {r['a_statuses']}, p50 {r['a_p50']:.1f} s, "
                f"Retry-After seen {r['a_retry_after']}"
            )
        # 32-text throughput, the servers taking turns so that drift in the machine's load
        # hits both alike.
        print(f"\n16 clients x 32 texts, sentences/s, {args.rounds} alternating rounds:")
        for name in urls:
            throughput(
                urls[name],
                tokens["c"],
                path="/batch-embed",
                texts_per_request=32,
                clients=16,
                seconds=3,
            )  # warm-up
        for round_number in range(args.rounds):
            for name in urls:
                run = throughput(
                    urls[name],
                    tokens["c"],
                    path="/batch-embed",
                    texts_per_request=32,
                    clients=16,
                    seconds=args.seconds,
                )
                results[name].setdefault("batch32", []).append(run["sentences_per_s"])
                failures = run["failures"]
                print(
                    f"  round {round_number + 1} {name:<14} {run['sentences_per_s']:7.1f} "
                    f"(p50 {run['p50']:.0f} ms, {len(failures)} failures"
                    + (f", first: {failures[0][:120]}" if failures else "")
                    + ")"
                )
    if args.baseline:
        new, old = results["this checkout"], results["baseline"]
        print("\nthis checkout / baseline:")
        print(
            f"  B's p99 during A's stream: {old['b_p99']:.2f} s -> {new['b_p99']:.2f} s "
            f"({new['b_p99'] / old['b_p99']:.2f}x)"
        )
        ratios = [n / o for n, o in zip(new["batch32"], old["batch32"], strict=True)]
        print(
            "  32-text throughput per round: "
            + ", ".join(f"{ratio:.1%}" for ratio in ratios)
            + f"; overall {sum(new['batch32']) / sum(old['batch32']):.1%}"
        )


if __name__ == "__main__":
    main()
