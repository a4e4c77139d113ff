"""The service's own Prometheus metrics, next to django-prometheus's request, database and cache
metrics. Labels never carry a tenant: that would make the series count unbounded.

Under gunicorn every worker writes to PROMETHEUS_MULTIPROC_DIR and /metrics adds them up, so the
totals are the service's, not one worker's.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

REQUESTS = Counter(
    "embed_requests_total",
    "Embedding requests answered, by endpoint and HTTP status.",
    ["endpoint", "status"],
)
REQUEST_DURATION = Histogram(
    "embed_request_duration_seconds",
    "Time to answer an embedding request.",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
ERRORS = Counter(
    "embed_errors_total",
    "Embedding requests that failed, by endpoint and error type.",
    ["endpoint", "type"],
)
TOKENS = Counter("embed_tokens_total", "Tokens embedded and charged.", ["endpoint"])
INPUTS = Counter("embed_inputs_total", "Texts embedded.", ["endpoint"])
BATCH_SIZE = Histogram(
    "embed_batch_size",
    "Texts per model forward pass after cross-request batching.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
CHARGE_GROUP_SIZE = Histogram(
    "embed_charge_group_size",
    "Charges (with their usage rows) committed together in one database transaction.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
QUEUE_WAIT = Histogram(
    "embed_queue_wait_seconds",
    "Time a request's texts waited for the model.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
BATCHER_REFUSALS = Counter(
    "embed_batcher_refusals_total",
    "Requests the model's queue refused: reason `overloaded` (503, the worker's queue is full) "
    "or `tenant_share` (429, the tenant holds its share of it).",
    ["reason"],
)
RATE_LIMITED = Counter("embed_rate_limited_total", "Requests refused by a rate limit.")
QUOTA_EXCEEDED = Counter(
    "embed_quota_exceeded_total", "Requests refused because the monthly quota is spent."
)
RATE_LIMIT_BACKEND_ERRORS = Counter(
    "embed_rate_limit_backend_errors_total",
    "Requests whose rate limits could not be checked because the cache (Redis) failed.",
)
MODEL_INFO = Gauge(
    "embed_model_info",
    "The served model; the value is always 1.",
    ["model", "dtype", "dimensions"],
    multiprocess_mode="max",
)
# "max" across gunicorn workers: one series, the slowest worker's load, not one per process id.
MODEL_LOAD_SECONDS = Gauge(
    "embed_model_load_seconds",
    "Seconds the model load took (under gunicorn, the slowest worker's).",
    multiprocess_mode="max",
)


_children: dict[tuple[Any, ...], Any] = {}
_children_lock = threading.Lock()
# Past this many series, new ones are not kept (each call then labels afresh): a label fed by
# the client (django-prometheus labels a latency by the raw HTTP method) must not grow it.
MAX_KEPT_CHILDREN = 4096


def child(metric: MetricWrapperBase, *label_values: str, **labels: str) -> Any:
    """`metric.labels(...)`, kept for the next request: prometheus_client builds and checks the
    key under a lock on every call, and each request sets a dozen series."""
    key = (id(metric), label_values, *labels.items())
    found = _children.get(key)
    if found is None:
        found = metric.labels(*label_values, **labels)
        if len(_children) < MAX_KEPT_CHILDREN:
            with _children_lock:
                found = _children.setdefault(key, found)
    return found
