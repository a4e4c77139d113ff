"""Middleware of our own: request ids, probes by IP, chunked request bodies, message storage
built on first use, and django-prometheus' per-view metrics with their series kept."""

from __future__ import annotations

import io
import random
import re
import uuid
from collections.abc import Callable

from django.conf import settings
from django.contrib.messages.middleware import MessageMiddleware
from django.contrib.messages.storage import default_storage
from django.contrib.messages.storage.base import BaseStorage
from django.http import HttpRequest, HttpResponse
from django.utils.functional import SimpleLazyObject
from django_prometheus.middleware import (
    PrometheusAfterMiddleware as DjangoPrometheusAfterMiddleware,
)
from prometheus_client.metrics import MetricWrapperBase

from embedplatform import metrics
from embedplatform.errors import api_error_response, request_too_large
from embedplatform.faults import MalformedBody, malformed_body

# Accept a caller's id only when it is short and plain, so it is safe to log and to echo back.
_ACCEPTABLE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_for(request: HttpRequest) -> str:
    supplied: str = request.META.get("HTTP_X_REQUEST_ID", "")
    if _ACCEPTABLE_REQUEST_ID.fullmatch(supplied):
        return supplied
    # From the process's Mersenne Twister (reseeded from os.urandom in each forked worker), not
    # uuid4's os.urandom: that is a system call that lets the GIL go, and taking it back among
    # busy request threads costs more than the rest of the middleware. An id names a request
    # in logs; it is not a secret.
    return uuid.UUID(int=random.getrandbits(128), version=4).hex


class RequestIdMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        # [attr-defined]: our attribute on Django's request, as auth's request.user is.
        request_id = request_id_for(request)
        request.request_id = request_id  # type: ignore[attr-defined]
        response = self.get_response(request)
        response["x-request-id"] = request_id
        return response


# Probes address a replica by its IP (Prometheus by DNS service discovery, container health
# checks by 127.0.0.1, load balancers by backend address), never by the public name that
# ALLOWED_HOSTS lists. These paths build no URL from the Host header, so checking it protects
# nothing there and would only make every probe a 400.
PROBE_PATHS = frozenset({"/health", "/metrics"})


class ProbeHostMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path_info in PROBE_PATHS:
            host = request.META.get("HTTP_HOST") or request.META.get("SERVER_NAME", "")
            # [method-assign]: this request alone answers for the address the probe used.
            request.get_host = lambda: host  # type: ignore[method-assign]
        return self.get_response(request)


class ChunkedBodyMiddleware:
    """Gives a chunked request body (no Content-Length) a length, as DRF reads a body without
    one as empty: the body is read up to DATA_UPLOAD_MAX_MEMORY_SIZE (more is a 413), on every
    path, so a malformed or truncated one is a 400 wherever it was sent."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        meta = request.META
        if "chunked" in meta.get("HTTP_TRANSFER_ENCODING", "").lower() and not meta.get(
            "CONTENT_LENGTH"
        ):
            limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
            try:
                body = meta["wsgi.input"].read(limit + 1)
            except MalformedBody:
                return api_error_response(malformed_body())
            if len(body) > limit:
                return api_error_response(request_too_large())
            meta["CONTENT_LENGTH"] = str(len(body))
            request._stream = io.BytesIO(body)
        return self.get_response(request)


class LazyMessageMiddleware(MessageMiddleware):
    """Django's message middleware, except that a request's message storage is built when
    something uses it (the admin, the browsable API's forms) and saved only then. API requests
    never do, and building it costs a cookie signer and two storages on every request."""

    def process_request(self, request: HttpRequest) -> None:
        # [attr-defined]: Django's own request attribute for the storage, and a flag of ours.
        request.message_storage_built = False  # type: ignore[attr-defined]

        def storage() -> BaseStorage:
            request.message_storage_built = True  # type: ignore[attr-defined]
            return default_storage(request)

        request._messages = SimpleLazyObject(storage)  # type: ignore[attr-defined]

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        if not getattr(request, "message_storage_built", True):
            return response
        return super().process_response(request, response)


class PrometheusAfterMiddleware(DjangoPrometheusAfterMiddleware):
    """django-prometheus' request metrics, the same series, with each labelled series looked up
    once (`metrics.child`) instead of labelled afresh: it sets nine per request, and
    prometheus_client's `labels` validates and locks on every call."""

    def label_metric(
        self,
        metric: MetricWrapperBase,
        request: HttpRequest,
        response: HttpResponse | None = None,
        **labels: str,
    ) -> MetricWrapperBase:
        return metrics.child(metric, **labels) if labels else metric
