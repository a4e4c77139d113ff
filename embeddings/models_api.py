"""GET /v1/models and GET /v1/models/{id}: OpenAI's model listing, so `client.models.list()` and
`client.models.retrieve(id)` work. It lists the served model under every name /v1/embeddings
accepts for it (its own, its short name, MODEL_NAME and MODEL_ALIASES)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import serializers
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import HasActiveTenant
from embeddings.encoder import bundled_model_path
from embeddings.runtime import accepted_model_names
from embeddings.services import require_runtime
from embedplatform.errors import ModelNotFound
from embedplatform.schema import (
    REQUEST_ID_IN,
    REQUEST_ID_OUT,
    WWW_AUTHENTICATE,
    X_TENANT,
    error_responses,
)

OWNER = "embedplatform"
# Listing models is authenticated like embedding, and refused the same ways before any work.
MODEL_ERRORS = (
    "missing_credentials",
    "invalid_signature",
    "token_expired",
    "invalid_api_key",
    "not_a_member",
    "tenant_inactive",
    "permission_denied",
)
HEADERS = [X_TENANT, REQUEST_ID_IN, REQUEST_ID_OUT, WWW_AUTHENTICATE]
MODEL_ID = OpenApiParameter(
    "model_id",
    OpenApiTypes.STR,
    OpenApiParameter.PATH,
    description="A model name from GET /v1/models; it may hold a slash "
    "(sentence-transformers/all-MiniLM-L6-v2).",
)


class OpenAIModelSerializer(serializers.Serializer):
    id = serializers.CharField(help_text="A name /v1/embeddings accepts in `model`.")
    object = serializers.CharField(help_text="Always `model`.")
    created = serializers.IntegerField(
        help_text="Unix time of the served model's files on this host (0 where unknown)."
    )
    owned_by = serializers.CharField(
        help_text="The hub organisation of the model (e.g. `google`), else `embedplatform`."
    )


class OpenAIModelListSerializer(serializers.Serializer):
    object = serializers.CharField(help_text="Always `list`.")
    # OpenAI's shape names a field "data", which the stubs read as overriding Serializer.data;
    # DRF's metaclass takes declared fields off the class, so at run time it does not.
    data = OpenAIModelSerializer(  # type: ignore[assignment]
        many=True, help_text="The served model first, then its aliases."
    )


def _model_files_time() -> int:
    """When the served model's files got here: stable across workers and restarts, unlike the
    load time. Found without the network: a local folder, or the hub cache's copy."""
    source = settings.MODEL_NAME
    config: Path | None = None
    if not source:
        config = bundled_model_path() / "config.json"
    elif Path(source).exists():
        config = Path(source) / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json", cache_dir=settings.HF_HOME)
        config = Path(cached) if isinstance(cached, str) else None
    try:
        return int(os.stat(config).st_mtime) if config is not None else 0
    except OSError:
        return 0


def served_models() -> list[dict[str, Any]]:
    served = require_runtime().encoder.name
    owner = served.split("/", 1)[0] if "/" in served else OWNER
    created = _model_files_time()
    names = [served, *sorted(accepted_model_names(served) - {served})]
    return [
        {"id": name, "object": "model", "created": created, "owned_by": owner} for name in names
    ]


class ModelsView(APIView):
    """The served model and its aliases, in OpenAI's shape."""

    permission_classes = [IsAuthenticated, HasActiveTenant]
    renderer_classes = [JSONRenderer]
    name = "OpenAI models"

    @extend_schema(
        operation_id="openai_models_list",
        tags=["OpenAI-compatible"],
        summary="List models (OpenAI-compatible)",
        description="The served model and every name /v1/embeddings accepts for it, in OpenAI's "
        "shape: `client.models.list()` works.",
        parameters=HEADERS,
        responses={200: OpenAIModelListSerializer, **error_responses(*MODEL_ERRORS)},
    )
    def get(self, request: Request) -> Response:
        body = {"object": "list", "data": served_models()}
        return Response(OpenAIModelListSerializer(body).data)


class ModelDetailView(APIView):
    """One model by a name /v1/embeddings accepts; 404 model_not_found otherwise."""

    permission_classes = [IsAuthenticated, HasActiveTenant]
    renderer_classes = [JSONRenderer]
    name = "OpenAI model"

    @extend_schema(
        operation_id="openai_models_retrieve",
        tags=["OpenAI-compatible"],
        summary="Retrieve a model (OpenAI-compatible)",
        description="One of the names GET /v1/models lists; any other is 404 "
        "`model_not_found`. `client.models.retrieve(id)` works.",
        parameters=[MODEL_ID, *HEADERS],
        responses={200: OpenAIModelSerializer, **error_responses(*MODEL_ERRORS, "model_not_found")},
    )
    def get(self, request: Request, model_id: str) -> Response:
        models = served_models()
        for model in models:
            if model["id"] == model_id:
                return Response(OpenAIModelSerializer(model).data)
        raise ModelNotFound(
            f"The model {model_id!r} does not exist here; this service serves {models[0]['id']!r}.",
            code="model_not_found",
            param="model",
        )


# The same for clients whose base URL has no /v1 (as /embeddings is); only the documented
# operation ids differ, which must be unique.
@extend_schema_view(
    get=extend_schema(
        operation_id="openai_models_list_without_v1",
        summary="List models (OpenAI-compatible, without /v1)",
    )
)
class ModelsWithoutV1View(ModelsView):
    pass


@extend_schema_view(
    get=extend_schema(
        operation_id="openai_models_retrieve_without_v1",
        summary="Retrieve a model (OpenAI-compatible, without /v1)",
    )
)
class ModelDetailWithoutV1View(ModelDetailView):
    pass
