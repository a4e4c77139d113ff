"""The embed APIs: /embed and /batch-embed (the original API), /v1/embeddings (OpenAI's), and
/health. Views only translate HTTP; `services.embed` does the work."""

from __future__ import annotations

import base64
import logging
from typing import Any

import numpy as np
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from rest_framework import exceptions, serializers
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import BaseRenderer, BrowsableAPIRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from accounts.metering.views import MeteredAPIView
from accounts.permissions import HasActiveTenant
from embeddings import serializers as io
from embeddings.renderers import VectorJSONRenderer
from embeddings.runtime import accepted_model_names, get_runtime
from embeddings.services import (
    EmbeddingResult,
    embed,
    require_runtime,
)
from embeddings.token_inputs import decode_token_inputs
from embedplatform.browsable import BrowsableForm
from embedplatform.errors import ModelNotFound, openai_status

logger = logging.getLogger(__name__)

# Every embed response says how many of its inputs were cut to the model's limit (0: none).
TRUNCATED_INPUTS_HEADER = "x-truncated-inputs"
# Accept headers that DRF's negotiation answers with the first renderer, JSON.
PLAIN_ACCEPTS = frozenset({"", "*/*", "application/json"})
JSON_RENDERER = VectorJSONRenderer()  # stateless: one serves every request


def usage_of(result: EmbeddingResult) -> dict[str, int]:
    # Embeddings have no completion: all tokens are prompt tokens.
    return {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}


def encode_base64(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


class MeteredEmbedView(BrowsableForm, MeteredAPIView):
    """Base of the embed views; metering (accounts/metering) counts, charges and logs each POST.

    Subclasses say which texts a valid body holds (`texts`) and how to answer (`render`)."""

    texts_param = "texts"
    counts_requests_with_tokens = True
    permission_classes = [IsAuthenticated, HasActiveTenant]
    renderer_classes = [VectorJSONRenderer, BrowsableAPIRenderer]
    serializer_class: type[serializers.Serializer]

    def served_model(self) -> str:
        runtime = get_runtime()
        return runtime.encoder.name if runtime is not None else ""

    def perform_content_negotiation(
        self, request: Request, force: bool = False
    ) -> tuple[BaseRenderer, str]:
        # What API clients send (no Accept, */*, or JSON) gets JSON at once: DRF's negotiation
        # would build every renderer and parse the header on each call to choose the same one.
        meta = request._request.META
        if meta.get("HTTP_ACCEPT", "") in PLAIN_ACCEPTS and not meta.get("QUERY_STRING"):
            return JSON_RENDERER, JSON_RENDERER.media_type
        return super().perform_content_negotiation(request, force)

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        runtime = get_runtime()
        if request.method != "POST" or runtime is None:
            return super().dispatch(request, *args, **kwargs)
        # From arrival on, the model may wait a moment for this request before its next pass.
        with runtime.batcher.expecting():
            return super().dispatch(request, *args, **kwargs)

    def post(self, request: Request) -> HttpResponseBase:
        if not isinstance(request.data, dict):
            raise exceptions.ParseError(
                "The request body must be a JSON object.", code="invalid_body"
            )
        serializer = self.serializer_class(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        assert self.meter is not None
        result = embed(
            meter=self.meter,
            texts=self.texts(data),
            prompt_name=data.get("prompt_name"),
            dimensions=data.get("dimensions"),
            normalize=data.get("normalize", True),
            truncate=data.get("truncate"),
            truncation_direction=data.get("truncation_direction", "right"),
            param=self.texts_param,
            max_texts=self.max_texts(),
        )
        body = self.render(result, data)
        headers = {TRUNCATED_INPUTS_HEADER: str(result.truncated_count)}
        if getattr(request, "accepted_renderer", None) is JSON_RENDERER:
            # What API clients get: the JSON written here, without DRF's template response
            # (built, rendered and passed through the template-response hooks of every
            # middleware) for a body that has only one rendering.
            return HttpResponse(
                JSON_RENDERER.render(body), content_type=JSON_RENDERER.media_type, headers=headers
            )
        return Response(body, headers=headers)

    def max_texts(self) -> int | None:
        """The most texts a request may carry here; None: the plan's texts per request."""
        return None

    def texts(self, data: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def render(self, result: EmbeddingResult, data: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class EmbedView(MeteredEmbedView):
    """Embed one text: `text`, and optionally `prompt_name` (a task prompt of the model),
    `dimensions` (keep the first N, Matryoshka) and `normalize`."""

    endpoint = "embed"
    texts_param = "text"
    serializer_class = io.EmbedInputSerializer

    def texts(self, data: dict[str, Any]) -> list[str]:
        return [data["text"]]

    def render(self, result: EmbeddingResult, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "embedding": result.vectors[0],
            "model": result.model,
            "dimensions": result.dimensions,
            "truncated": result.truncated[0],
            "usage": usage_of(result),
        }


class BatchEmbedView(MeteredEmbedView):
    """Embed many texts in one request; the order of the answer is the order of the texts."""

    endpoint = "batch_embed"
    serializer_class = io.BatchEmbedInputSerializer

    def texts(self, data: dict[str, Any]) -> list[str]:
        return list(data["texts"])

    def render(self, result: EmbeddingResult, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "embeddings": result.vectors,
            "model": result.model,
            "dimensions": result.dimensions,
            "truncated": result.truncated,
            "usage": usage_of(result),
        }


class OpenAIEmbeddingsView(MeteredEmbedView):
    """OpenAI-compatible embeddings: the official `openai` client works unchanged with
    `base_url=http://host:port/v1`."""

    endpoint = "openai_embeddings"
    texts_param = "input"
    serializer_class = io.OpenAIEmbeddingInputSerializer
    name = "OpenAI embeddings"  # the browsable API's title ("Open Ai Embeddings" otherwise)

    def max_texts(self) -> int | None:
        assert self.meter is not None
        assert self.meter.limits is not None
        return self.meter.limits.max_openai_inputs_per_request

    def handle_exception(self, exc: Exception) -> Response:
        # OpenAI answers every invalid request with 400, and code written for it catches
        # openai.BadRequestError; the original API keeps FastAPI's 422 (and 413 for too many
        # texts). Only the status differs: type, code, param and message are the same.
        response = super().handle_exception(exc)
        response.status_code = openai_status(response.status_code, response.data)
        return response

    def texts(self, data: dict[str, Any]) -> list[str]:
        requested_model = data.get("model")
        served = require_runtime().encoder.name
        if requested_model and requested_model not in accepted_model_names(served):
            raise ModelNotFound(
                f"The model {requested_model!r} does not exist here; this service serves "
                f"{served!r}.",
                code="model_not_found",
                param="model",
            )
        return decode_token_inputs(data["input"])

    def render(self, result: EmbeddingResult, data: dict[str, Any]) -> dict[str, Any]:
        as_base64 = data["encoding_format"] == "base64"
        items = [
            {
                "object": "embedding",
                "index": index,
                "embedding": encode_base64(vector) if as_base64 else vector,
            }
            for index, vector in enumerate(result.vectors)
        ]
        return {"object": "list", "data": items, "model": result.model, "usage": usage_of(result)}
