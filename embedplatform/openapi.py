"""The project-wide part of the OpenAPI document, as SPECTACULAR_SETTINGS takes it: the
description, the tags, the /metrics token scheme and the /metrics path (a plain Django view, which
drf-spectacular does not discover). Plain data, read by settings.py; each app's operations are
described beside its views (embeddings/schema.py, accounts/schema.py)."""

from __future__ import annotations

import json
from typing import Any

from embedplatform.error_codes import CATALOGUE

DESCRIPTION = """\
Text embeddings for many tenants: the original service's `/embed` and `/batch-embed`, and an
OpenAI-compatible `/v1/embeddings` that the official `openai` client uses unchanged
(`base_url="https://<host>/v1"`).

**Authentication**: every embed and usage endpoint needs `Authorization: Bearer <credential>`,
a Supabase access token or a tenant API key (see the `bearerAuth` scheme). `/health`, `/docs`,
`/redoc` and `/openapi.json` need none; `/metrics` takes its own token when one is configured.

**Tenants**: a user who belongs to several tenants picks one with the `X-Tenant` header (the
tenant's id); without it, the user's default tenant pays.

**Limits**: each tenant has requests-per-minute and tokens-per-minute limits, reported on every
embed response in the `x-ratelimit-*` headers, a monthly token quota (`GET /usage`), and a
maximum number of texts per request. Every request is logged with its `x-request-id`; a served
request is charged once, a refused one costs nothing.

**Errors** all have one shape, OpenAI's, so that the `openai` client raises its own exceptions
with our message:

```json
{EXAMPLE}
```

400 malformed body, 401 missing or bad credential, 403 not allowed, 404 unknown model or path,
413 too large, 415 not JSON, 422 invalid field, 429 rate limit or quota, 503 not ready.""".replace(
    "{EXAMPLE}", json.dumps(CATALOGUE["empty_text"].example_body(), ensure_ascii=False)
)

TAGS = [
    {"name": "Embeddings", "description": "The original service's API."},
    {
        "name": "OpenAI-compatible",
        "description": "OpenAI's embeddings API: point the `openai` client's `base_url` here.",
    },
    {"name": "Account", "description": "What the calling tenant has used."},
    {"name": "Operations", "description": "Readiness and Prometheus metrics."},
]


METRICS_DESCRIPTION = """\
`Authorization: Bearer <METRICS_TOKEN>`: required by /metrics when the service is configured
with a `METRICS_TOKEN`; without one, /metrics is open (keep it on a private network)."""


COMPONENTS: dict[str, Any] = {
    "securitySchemes": {
        "metricsToken": {"type": "http", "scheme": "bearer", "description": METRICS_DESCRIPTION}
    }
}

_REQUEST_ID = {
    "schema": {"type": "string"},
    "description": "This request's id, as in the service's logs.",
}
_INVALID_TOKEN = CATALOGUE["invalid_metrics_token"]
PATHS: dict[str, Any] = {
    "/metrics": {
        "get": {
            "operationId": "metrics_retrieve",
            "summary": "Prometheus metrics",
            "description": "The Prometheus text exposition format, added up over all worker "
            "processes: `embed_requests_total{endpoint,status}`, "
            "`embed_request_duration_seconds{endpoint}`, `embed_errors_total{endpoint,type}`, "
            "`embed_tokens_total{endpoint}`, `embed_inputs_total`, `embed_batch_size`, "
            "`embed_queue_wait_seconds`, `embed_rate_limited_total`, "
            "`embed_quota_exceeded_total`, `embed_rate_limit_backend_errors_total`, "
            "`embed_model_info{model,dtype,dimensions}`, `embed_model_load_seconds`, and "
            "django-prometheus' request, database and cache metrics. No metric has a tenant "
            "label.",
            "tags": ["Operations"],
            "security": [{"metricsToken": []}, {}],
            "responses": {
                "200": {
                    "description": "The metrics.",
                    "headers": {"x-request-id": _REQUEST_ID},
                    "content": {
                        "text/plain": {
                            "schema": {"type": "string"},
                            "example": "# HELP embed_requests_total Embedding requests "
                            "answered, by endpoint and HTTP status.\n"
                            "# TYPE embed_requests_total counter\n"
                            'embed_requests_total{endpoint="embed",status="200"} 42.0\n',
                        }
                    },
                },
                str(_INVALID_TOKEN.status): {
                    "description": "`METRICS_TOKEN` is configured and the request does not "
                    "carry it as a bearer token.",
                    "headers": {
                        "x-request-id": _REQUEST_ID,
                        "WWW-Authenticate": {
                            "schema": {"type": "string"},
                            "description": 'The challenge: `Bearer realm="metrics"`.',
                        },
                    },
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/Error"},
                            "example": _INVALID_TOKEN.example_body(),
                        }
                    },
                },
            },
        }
    }
}
