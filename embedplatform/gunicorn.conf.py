"""gunicorn settings: gthread workers, each loading the model once and batching its requests.

Every value comes from the environment, with defaults that fit the machine: one worker per two
cores at most, and torch threads = cores // workers, because workers x torch threads above the
core count makes every forward pass wait on the others.
"""

from __future__ import annotations

import os
import shutil
import tempfile

_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

bind = os.environ.get("GUNICORN_BIND", f"0.0.0.0:{os.environ.get('PORT', '8000')}")
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
worker_class = "gthread"
# Request threads mostly wait for the batcher, so many are cheap and let requests share passes.
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "5"))
wsgi_app = "embedplatform.wsgi:application"
preload_app = False

# Tell the app it is serving, so the embeddings app loads the model in each worker, and size
# torch's threads to this worker's share of the cores.
os.environ["EMBEDPLATFORM_SERVING"] = "1"
os.environ["WEB_CONCURRENCY"] = str(workers)

# Prometheus multiprocess mode: each worker writes its samples to files that /metrics adds up.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="embedplatform-metrics-")
_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]

accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-")
access_log_format = (
    '{"time": "%(t)s", "event": "access", "remote": "%(h)s", "method": "%(m)s", '
    '"path": "%(U)s", "status": %(s)s, "bytes": "%(B)s", "duration_ms": %(M)s, '
    '"request_id": "%({x-request-id}o)s", "user_agent": "%(a)s"}'
)
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()


def on_starting(server: object) -> None:
    # Samples left by a previous run would be added to this one's.
    if os.path.isdir(_metrics_dir):
        for entry in os.listdir(_metrics_dir):
            path = os.path.join(_metrics_dir, entry)
            if os.path.isfile(path):
                os.remove(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
    os.makedirs(_metrics_dir, exist_ok=True)


def child_exit(server: object, worker: object) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]
