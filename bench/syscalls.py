"""System calls and context switches per request of the service's workers, counted by the kernel.

    .venv/bin/python bench/syscalls.py [--seconds 8] [--clients 16] [--baseline DIR]
        [--database env|sqlite]

Each system call that may block lets the GIL go, and among a worker's busy request threads
taking it back costs a context switch or two: on 2 cores those switches are a good part of what
a request costs. This starts the service on the minimal EmbeddingGemma-architecture encoder (as
`bench/service.py --ceiling` does), loads it with 1-text short queries from
bench/raw_load.py, and counts with `perf stat -p <workers>` (Debian's linux-perf) the
system calls by kind and the context switches, per request, with the workers' CPU per request.
With --baseline DIR another checkout is counted the same way, after this one.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench.service  # noqa: E402  (sets up the environment: offline, no model at start)
from bench import raw_load  # noqa: E402
from bench.cpu_profile import cpu_seconds_by_process  # noqa: E402
from bench.embedded import use_embedded_default  # noqa: E402

SYSCALLS = ("futex", "poll", "sendto", "recvfrom", "write", "read", "ioctl", "epoll_wait")
EVENTS = [f"syscalls:sys_enter_{name}" for name in SYSCALLS] + ["context-switches"]


def count(
    checkout: Path, encoder: Path, token: str, *, clients: int, seconds: float
) -> dict[str, Any]:
    """Per request: each event's count, the workers' CPU (us), and the requests/s."""
    service = bench.service.start_checkout_service(
        checkout, {"MODEL_NAME": str(encoder), "MODEL_QUANTIZATION": "fp32"}, workers=None
    )
    try:
        host, port = service.url.removeprefix("http://").split(":")
        requests = raw_load.prebuilt_requests(
            bench.service.short_queries(512, seed=11),
            host=host,
            port=int(port),
            path="/embed",
            token=token,
        )
        raw_load.run(service.url, requests, clients=clients, seconds=2)  # warm up
        workers = subprocess.check_output(["pgrep", "-P", str(service.process.pid)], text=True)
        output = Path(tempfile.mkdtemp(prefix="bench-perf-")) / "stat.csv"
        perf = subprocess.Popen(
            [
                *("perf", "stat", "-x", ",", "-o", str(output), "-e", ",".join(EVENTS)),
                *("-p", ",".join(workers.split())),
            ]
        )
        time.sleep(0.5)  # perf attaches
        before = cpu_seconds_by_process(service.process.pid)
        run = raw_load.run(service.url, requests, clients=clients, seconds=seconds)
        after = cpu_seconds_by_process(service.process.pid)
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=30)
    finally:
        service.stop()
    requests_done = max(1, run["requests"])
    counts: dict[str, Any] = {
        "requests_per_s": run["requests_per_s"],
        "failures": run["failures"],
        "cpu_us": (after["gunicorn"] - before["gunicorn"]) * 1e6 / requests_done,
    }
    for line in output.read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].replace(".", "").isdigit():
            name = fields[2].removeprefix("syscalls:sys_enter_")
            counts[name] = float(fields[0]) / requests_done
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--database", choices=["env", "sqlite"], default="env")
    parser.add_argument("--baseline", type=Path, help="another checkout, counted after this one")
    args = parser.parse_args()
    if args.database == "sqlite":
        use_embedded_default("embedplatform-bench-sqlite-")

    from bench.gemma_builder import build_gemma_like_model

    token = bench.service.prepare_tenant()
    encoder = build_gemma_like_model(
        Path(tempfile.mkdtemp(prefix="bench-syscalls-gemma-")) / "gemma", size="minimal"
    )
    checkouts = {"this checkout": ROOT}
    if args.baseline:
        checkouts["baseline"] = args.baseline.resolve()
    rows = {
        label: count(checkout, encoder, token, clients=args.clients, seconds=args.seconds)
        for label, checkout in checkouts.items()
    }
    print(
        f"\nper 1-text request, {args.clients} clients, minimal encoder (perf stat on the workers)"
    )
    names = ["requests_per_s", "cpu_us", "context-switches", *SYSCALLS]
    print(f"  {'':<20}" + "".join(f"{label:>16}" for label in rows))
    for name in names:
        print(
            f"  {name:<20}"
            + "".join(f"{row.get(name, float('nan')):16.2f}" for row in rows.values())
        )
    for label, row in rows.items():
        if row["failures"]:
            print(f"  {label}: {len(row['failures'])} failed requests, first: {row['failures'][0]}")


if __name__ == "__main__":
    main()
