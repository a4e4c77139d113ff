"""CPU per request by part of the stack, sampled by py-spy from a running gunicorn (used by
bench/service.py --profile)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

# Where a sampled stack's time goes: the innermost frame that matches a part names it.
PARTS = [
    ("logging", ("logging/__init__", "embedplatform/logs", "pythonjsonlogger")),
    ("metrics", ("prometheus_client", "django_prometheus", "embedplatform/metrics")),
    ("Redis", ("redis/", "django_redis", "django_ratelimit")),
    ("SQL", ("django/db/", "psycopg", "sqlite3")),
    ("tokenization", ("tokenizers", "count_tokens", "tokenization_utils")),
    ("model", ("torch/", "sentence_transformers", "transformers/")),
    ("batcher hand-off", ("embeddings/batching", "concurrent/futures", "threading.py")),
    ("rendering", ("renderers", "orjson", "json/encoder", "embeddings/views.py")),
    ("authentication", ("accounts/authentication", "accounts/jwt", "jwt/", "credential_cache")),
    ("metering", ("accounts/metering", "accounts/ratelimit", "accounts/permissions")),
    ("DRF", ("rest_framework",)),
    ("HTTP parsing", ("gunicorn/http", "django/core/handlers/wsgi", "django/http/request")),
    ("middleware", ("middleware", "django/utils/deprecation", "django/core/handlers")),
    ("gunicorn", ("gunicorn",)),
]


def part_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for part, needles in PARTS:
            if any(needle in frame for needle in needles):
                return part
    return "other"


def profile_breakdown(raw: Path, rate: int, requests: int) -> list[tuple[str, float]]:
    """CPU microseconds per request by part, from py-spy's raw (collapsed) output."""
    samples: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples[part_of(stack)] += int(count)
    per_request = 1e6 / rate / max(1, requests)
    return [(part, count * per_request) for part, count in samples.most_common()]


def profiled(
    service: Any, run: Any, runs: dict[str, dict[str, Any]], name: str
) -> list[tuple[str, float]]:
    """Runs `run()` with py-spy sampling every gunicorn process of `service`."""
    rate = 250
    raw = Path(tempfile.mkdtemp(prefix="bench-profile-")) / "stacks.txt"
    spy = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(service.process.pid),
            "--subprocesses",
            "--nonblocking",
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches
    try:
        runs[name] = run()
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
    return profile_breakdown(raw, rate, runs[name]["requests"])


def stat_fields(path: str) -> list[str]:
    """The fields of a /proc/<pid>/stat (or task) file after the command name: index 1 is the
    parent, 11 and 12 the user and system ticks. Raises OSError once it has ended."""
    with open(path) as stat:
        return stat.read().rsplit(")", 1)[1].split()


def cpu_seconds(fields: list[str]) -> float:
    """User + system CPU seconds of `stat_fields`."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds_by_process(gunicorn_pid: int) -> dict[str, float]:
    """CPU seconds so far (user + system) of the service's gunicorn processes, and of every
    PostgreSQL and Redis server process on the machine: read before and after a run, the
    difference over the requests served is what one request costs each of them."""
    totals = {"gunicorn": 0.0, "PostgreSQL": 0.0, "Redis": 0.0}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = stat_fields(f"/proc/{pid}/stat")
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent = int(fields[1])
        if int(pid) == gunicorn_pid or parent == gunicorn_pid:
            name = "gunicorn"
        elif command.startswith("postgres"):
            name = "PostgreSQL"
        elif "redis-server" in command:
            name = "Redis"
        else:
            continue
        totals[name] += cpu_seconds(fields)
    return totals


def worker_pids(gunicorn_pid: int) -> list[int]:
    """The arbiter's children: gunicorn's workers."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(stat_fields(f"/proc/{pid}/stat")[1]) == gunicorn_pid:
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def thread_cpu_seconds(gunicorn_pid: int) -> dict[int, float]:
    """CPU seconds so far of every thread of every worker, by thread id."""
    seconds = {}
    for pid in worker_pids(gunicorn_pid):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                seconds[int(tid)] = cpu_seconds(stat_fields(f"/proc/{pid}/task/{tid}/stat"))
            except OSError:
                continue
    return seconds


def thread_roles(gunicorn_pid: int) -> dict[int, str]:
    """What each worker thread does, by thread id, from the Python thread names `py-spy dump`
    shows (Python does not pass them on to the OS): gunicorn's main thread, its request
    threads (a ThreadPoolExecutor), and our own named threads (embed-batcher, charge-writer)."""
    roles = {}
    for pid in worker_pids(gunicorn_pid):
        dump = subprocess.run(
            [str(Path(sys.executable).parent / "py-spy"), "dump", "--pid", str(pid)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
        for line in dump.splitlines():
            # Thread 17611 (idle): "ThreadPoolExecutor-1_0"
            if not line.startswith("Thread ") or '"' not in line:
                continue
            tid, name = line.split()[1], line.split('"')[1]
            if not tid.isdigit():
                continue
            if name == "MainThread":
                roles[int(tid)] = "gunicorn main"
            elif name.startswith("ThreadPoolExecutor"):
                roles[int(tid)] = "request threads"
            else:
                roles[int(tid)] = name
    return roles
