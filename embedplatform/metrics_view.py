"""GET /metrics: django-prometheus's exporter behind an optional bearer token.

With METRICS_TOKEN set, a scrape must send `Authorization: Bearer <METRICS_TOKEN>`; without it the
endpoint is open, for a Prometheus on a private network. Under gunicorn the exporter adds up the
samples of every worker (PROMETHEUS_MULTIPROC_DIR, set by gunicorn.conf.py).
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django_prometheus.exports import ExportToDjangoView

from embedplatform.errors import AUTHENTICATION, INVALID_REQUEST, json_error


def _presented_token(request: HttpRequest) -> str:
    scheme, _, token = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def scrape_allowed(request: HttpRequest) -> bool:
    expected = settings.METRICS_TOKEN
    if not expected:
        return True
    # Bytes, so a non-ASCII guess cannot raise; compare_digest, so timing does not leak the token.
    return hmac.compare_digest(_presented_token(request).encode(), expected.encode())


# Exempt so that a wrong method gets its 405 rather than a CSRF page; nothing here writes.
@csrf_exempt
def metrics_view(request: HttpRequest) -> HttpResponse:
    if request.method not in ("GET", "HEAD"):
        return json_error(
            405,
            f"Method {request.method} is not allowed on /metrics; use GET.",
            error_type=INVALID_REQUEST,
            code="method_not_allowed",
            headers={"Allow": "GET, HEAD"},
        )
    if not scrape_allowed(request):
        return json_error(
            401,
            "GET /metrics needs `Authorization: Bearer <METRICS_TOKEN>`.",
            error_type=AUTHENTICATION,
            code="invalid_metrics_token",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    response: HttpResponse = ExportToDjangoView(request)
    return response
