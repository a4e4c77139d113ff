"""GET /health: ready when the model is loaded and the database (and Redis, where configured)
answer; 503 with what is failing otherwise. Needs no credential: probes call it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connection
from django_redis import get_redis_connection
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from embeddings.encoder import Encoder
from embeddings.runtime import get_runtime
from embedplatform.error_codes import CATALOGUE
from embedplatform.errors import ErrorDetailSerializer

HEALTHY_STATES = ("ok", "local")


@dataclass(frozen=True)
class Readiness:
    checks: dict[str, str]
    encoder: Encoder | None

    @property
    def failing(self) -> list[str]:
        return [name for name, state in self.checks.items() if state not in HEALTHY_STATES]

    @property
    def status(self) -> str:
        return "unavailable" if self.failing else "ok"

    @property
    def prompts(self) -> list[str] | None:
        return sorted(self.encoder.prompts) if self.encoder is not None else None

    @property
    def error(self) -> dict[str, Any] | None:
        if not self.failing:
            return None
        body = CATALOGUE["not_ready"].body(failing=", ".join(self.failing))
        return dict(body["error"])


class HealthSerializer(serializers.Serializer):
    """Readiness: the model's fields once it is loaded, `error` only when not ready."""

    status = serializers.ChoiceField(
        choices=("ok", "unavailable"), help_text="`ok` when ready to serve."
    )
    checks = serializers.DictField(
        child=serializers.CharField(),
        help_text="Each dependency's state: `model`, `database`, and `redis` (or `cache: "
        "local` without Redis); `ok` or what failed.",
    )
    model = serializers.CharField(
        source="encoder.name", required=False, help_text="The served model, once loaded."
    )
    dimensions = serializers.IntegerField(
        source="encoder.dimensions", required=False, help_text="Its embedding size."
    )
    dtype = serializers.CharField(
        source="encoder.dtype", required=False, help_text="int8, bf16, fp16 or fp32."
    )
    max_seq_length = serializers.IntegerField(
        source="encoder.max_seq_length", required=False, help_text="Tokens per text."
    )
    prompts = serializers.ListField(
        child=serializers.CharField(),
        required=False,
        help_text="The model's task prompt names, for `prompt_name`.",
    )
    error = ErrorDetailSerializer(required=False, help_text="Only when not ready (503).")

    def to_representation(self, instance: Any) -> dict[str, Any]:
        # Optional parts that do not apply are left out rather than sent as null.
        data = super().to_representation(instance)
        return {name: value for name, value in data.items() if value is not None}


def check_readiness() -> Readiness:
    checks: dict[str, str] = {}
    runtime = get_runtime()
    checks["model"] = "ok" if runtime is not None else "not loaded"
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means "not ready", never a 500
        checks["database"] = f"error: {type(exc).__name__}"
    if settings.REDIS_URL:
        try:
            get_redis_connection("default").ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
    else:
        checks["cache"] = "local"
    return Readiness(checks=checks, encoder=runtime.encoder if runtime is not None else None)


class HealthView(APIView):
    """Ready when the model is loaded and the database (and Redis, where configured) answer."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    renderer_classes = [JSONRenderer]

    def get(self, request: Request) -> Response:
        readiness = check_readiness()
        status = 503 if readiness.failing else 200
        return Response(HealthSerializer(readiness).data, status=status)
