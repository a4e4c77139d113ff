"""gunicorn settings: gthread workers, each loading the model once and batching its requests.

Every value comes from the environment, with defaults that fit the machine:

- WEB_CONCURRENCY workers (default: one per core, at most 4), each holding its own copy of the
  model: separate processes keep each worker's Python work (HTTP, auth, accounting) off the other
  workers' GIL; measured on 2 cores with MiniLM, 2 workers x 1 torch thread serve 1-text requests
  from 16 clients at 98 sentences/s where 1 worker x 2 threads manage 77. Beyond 4, memory (one
  model each) outweighs the gain, so larger machines get more torch threads per worker instead;
- GUNICORN_THREADS request threads per worker (default 32): they mostly wait for the batcher, so
  many are cheap and let concurrent requests share forward passes;
- TORCH_THREADS torch threads per worker (default: cores // workers), because workers x torch
  threads above the core count makes every forward pass wait on the others.

"Cores" honours a container's CPU limit (cgroup quota, e.g. compose's `cpus: '2.0'`), which the
affinity mask does not show: on a 64-core host a 2-CPU container must not start 32 workers.

On SIGTERM a worker closes its listening sockets (new connections are refused at once), finishes
what it accepted or refuses it with a 503 before GUNICORN_GRACEFUL_TIMEOUT seconds run out, then
exits 0 (embedplatform/shutdown.py). Every log line, access lines included, is JSON.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# The project root, so `embedplatform` imports whatever directory gunicorn was started from.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import environ  # noqa: E402

from embedplatform.cpus import available_cores, torch_threads_per_worker  # noqa: E402

# The same .env the Django settings read, so WEB_CONCURRENCY and friends can live there too.
_env_file = Path(os.environ.get("ENV_FILE") or ROOT / ".env")
if _env_file.is_file():
    environ.Env.read_env(_env_file, overwrite=False)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


cores = available_cores()
MAX_DEFAULT_WORKERS = 4

bind = os.environ.get("GUNICORN_BIND") or f"0.0.0.0:{os.environ.get('PORT') or '8000'}"
workers = max(1, _env_int("WEB_CONCURRENCY", min(cores, MAX_DEFAULT_WORKERS)))
# gunicorn's gthread worker, leaving cleanly on SIGTERM (embedplatform/shutdown.py).
worker_class = "embedplatform.shutdown.GracefulThreadWorker"
threads = max(1, _env_int("GUNICORN_THREADS", 32))
# A worker that has not checked in for this long is killed and replaced. Model loading happens
# before the first check-in, so the container entrypoint downloads the model beforehand.
timeout = _env_int("GUNICORN_TIMEOUT", 120)
# How long a stopping worker may take to finish its requests in flight.
graceful_timeout = _env_int("GUNICORN_GRACEFUL_TIMEOUT", 30)
keepalive = _env_int("GUNICORN_KEEPALIVE", 5)
# Replace a worker after this many requests (plus jitter, so they do not all go at once): memory
# that fragmentation leaves behind is returned. The worker leaves as on SIGTERM, finishing what
# it accepted while the others (and its replacement) take new connections. A replacement loads
# the model again, seconds of a core while the other workers carry everything, so this is rare:
# at 2000 a worker serving 100 requests/s was replaced every 20 s, and replacing one every 500
# requests cut MiniLM's throughput from 199 to 58 requests/s with a p99 of 7.5 s (measured).
max_requests = _env_int("GUNICORN_MAX_REQUESTS", 100_000)
max_requests_jitter = _env_int("GUNICORN_MAX_REQUESTS_JITTER", 10_000)
# What one request may send before the app sees it; the body limit is Django's
# DATA_UPLOAD_MAX_MEMORY_SIZE (413), and a stalled socket read or write is dropped after
# GUNICORN_CLIENT_TIMEOUT seconds (embedplatform/shutdown.py).
limit_request_line = _env_int("GUNICORN_LIMIT_REQUEST_LINE", 4094)
limit_request_field_size = _env_int("GUNICORN_LIMIT_REQUEST_FIELD_SIZE", 8190)
limit_request_fields = _env_int("GUNICORN_LIMIT_REQUEST_FIELDS", 100)
wsgi_app = "embedplatform.wsgi:application"
chdir = str(ROOT)
preload_app = False
# gunicorn's control socket (gunicornc) defaults to one path per user, which two servers on one
# host would fight over; it is opt-in here.
if os.environ.get("GUNICORN_CONTROL_SOCKET"):
    control_socket = os.environ["GUNICORN_CONTROL_SOCKET"]
else:
    control_socket_disable = True
# The heartbeat file lives in memory: on a container's overlay filesystem its writes can stall.
if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
    worker_tmp_dir = "/dev/shm"

# Size torch's threads to each worker's share of the cores (embeddings.encoder.torch_threads
# reads TORCH_THREADS and WEB_CONCURRENCY from settings).
os.environ["WEB_CONCURRENCY"] = str(workers)
if _env_int("TORCH_THREADS", 0) <= 0:
    os.environ["TORCH_THREADS"] = str(torch_threads_per_worker(workers, cores))
# Progress bars (model download, weight loading) would put non-JSON lines in the log.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Prometheus multiprocess mode: each worker writes its samples to files that /metrics adds up.
# Set before any worker imports prometheus_client, which picks its value store at import.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="embedplatform-metrics-")
_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]


# One JSON object per line, access lines included, each carrying the request id.
logger_class = "embedplatform.logs.GunicornJsonLogger"
# Unset: stdout. Set but empty: no access log (gunicorn needs None for that, not "").
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-") or None
errorlog = "-"
loglevel = (os.environ.get("LOG_LEVEL") or "info").lower()


def on_starting(server: Any) -> None:
    # Samples left by a previous run would be added to this one's.
    # Only prometheus_client's own *.db files: a mis-set folder must not lose anything else.
    os.makedirs(_metrics_dir, exist_ok=True)
    for stale in Path(_metrics_dir).glob("*.db"):
        stale.unlink(missing_ok=True)
    server.log.info(
        "gunicorn_settings",
        extra={
            "workers": workers,
            "threads": threads,
            "torch_threads": int(os.environ["TORCH_THREADS"]),
            "cores": cores,
            "timeout": timeout,
            "graceful_timeout": graceful_timeout,
            "keepalive": keepalive,
            "max_requests": max_requests,
            "max_requests_jitter": max_requests_jitter,
        },
    )


def post_worker_init(worker: Any) -> None:
    # In each worker, once Django is set up and before it takes its first request or checks in
    # (so GUNICORN_TIMEOUT covers the model load): the configuration warnings, token-id input and,
    # with MODEL_LOAD_ON_START, the model. A failure here stops the worker from booting, and
    # gunicorn from starting, as a broken model must.
    from embedplatform.serving import start_serving_process

    start_serving_process()


def child_exit(server: Any, worker: Any) -> None:
    # Live gauges of a dead worker must stop counting; its counters stay in the totals.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
