"""Worker RSS under sustained large inputs, against a real gunicorn, in one run.

    .venv/bin/python bench/rss_plateau.py [--baseline DIR] [--requests 40] \
        [--env MALLOC_ARENA_MAX=2]

Starts one gunicorn worker (MiniLM) from this checkout (and, with --baseline, from another
checkout first, the same way), sends `--requests` /embed requests each carrying one ~1 MB text
from `--clients` concurrent clients, and prints the worker's RSS before, every tenth of the way,
and after, with each request's latency and the tokens charged. A plateau means the last prints
stay flat. `--env` passes settings to the service (e.g. the allocator's MALLOC_ARENA_MAX).

The machine is shared and noisy: compare figures of one run, not across runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fairness import Client, prepare_tenants, serving  # noqa: E402
from bench.service import percentile  # noqa: E402

MEGABYTE_TEXT = (
    "Tenants share one model, and a megabyte of text must not cost a gigabyte. " * 14_000
)


def worker_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [int(pid) for pid in children]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(service: Any, token: str, args: argparse.Namespace) -> dict[str, Any]:
    (worker,) = worker_pids(service.process.pid)
    Client(service.url, token).post("/embed", {"text": "warm up"})
    before = rss_mb(worker)
    samples = [(0, before)]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    done = [0]
    lock = threading.Lock()
    step = max(1, args.requests // 10)

    def client() -> None:
        connection = Client(service.url, token)
        while True:
            with lock:
                if done[0] >= args.requests:
                    return
                done[0] += 1
            status, elapsed, _ = connection.post("/embed", {"text": MEGABYTE_TEXT})
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                latencies.append(elapsed)
                finished = sum(statuses.values())
                if finished % step == 0:
                    samples.append((finished, rss_mb(worker)))

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    time.sleep(1)
    return {
        "before": before,
        "after": rss_mb(worker),
        "samples": samples,
        "statuses": statuses,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--quantization", default=os.environ.get("MODEL_QUANTIZATION", "auto"))
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the service")
    args = parser.parse_args()

    token = prepare_tenants(["memory"])["memory"]
    env = {"MODEL_NAME": "", "MODEL_QUANTIZATION": args.quantization}
    env.update(item.split("=", 1) for item in args.env)
    targets = [("this checkout", ROOT)]
    if args.baseline:
        targets.insert(0, ("baseline", args.baseline.resolve()))
    size = len(MEGABYTE_TEXT.encode()) / 1e6
    print(
        f"MiniLM, quantization={args.quantization}, 1 worker, {args.requests} requests of one "
        f"{size:.2f} MB text from {args.clients} clients, service env {args.env or 'default'} "
        "(shared, noisy machine: compare within this run)"
    )
    results = {}
    for name, checkout in targets:
        with serving(checkout, env, workers=1) as service:
            results[name] = r = run(service, token, args)
        trail = "  ".join(f"{n}:{mb:.0f}" for n, mb in r["samples"])
        print(f"\n{name} ({checkout})")
        print(
            f"  worker RSS before {r['before']:.0f} MB, after {r['after']:.0f} MB "
            f"({r['after'] - r['before']:+.0f} MB)"
        )
        print(f"  RSS MB after n requests: {trail}")
        print(f"  statuses {r['statuses']}, latency p50 {r['p50']:.2f} s, p99 {r['p99']:.2f} s")
    if args.baseline:
        new, old = results["this checkout"], results["baseline"]
        print("\nthis checkout vs baseline:")
        print(
            f"  RSS growth: {new['after'] - new['before']:+.0f} MB vs "
            f"{old['after'] - old['before']:+.0f} MB"
        )
        print(f"  latency p50: {new['p50'] / old['p50']:.2f}x")


if __name__ == "__main__":
    main()
