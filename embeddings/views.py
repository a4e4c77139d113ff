"""The embed APIs: /embed and /batch-embed (the original API), /v1/embeddings (OpenAI's), and
/health. Views only translate HTTP; `services.embed` does the work."""

from __future__ import annotations

import base64
import logging
from typing import Any

import numpy as np
from rest_framework import exceptions, serializers
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts import services as accounts
from accounts.permissions import HasActiveTenant
from accounts.ratelimit import count_request, with_remaining_tokens
from accounts.selectors import effective_limits
from embeddings import serializers as io
from embeddings.runtime import accepted_model_names, get_runtime
from embeddings.services import (
    EmbeddingResult,
    MeteredCall,
    embed,
    require_runtime,
)
from embeddings.token_inputs import decode_token_inputs
from embedplatform import metrics
from embedplatform.browsable import BrowsableForm
from embedplatform.errors import ModelNotFound

logger = logging.getLogger(__name__)


def usage_of(result: EmbeddingResult) -> dict[str, int]:
    # Embeddings have no completion: all tokens are prompt tokens.
    return {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}


def encode_base64(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


class MeteredEmbedView(BrowsableForm, APIView):
    """Base of the embed views. A POST that passed authentication counts against the tenant's
    requests per minute and leaves exactly one usage row (served: charged; refused: zero
    tokens, with its error type); every POST is counted in the metrics, and from the rate-limit
    step on its response carries the tenant's x-ratelimit-* headers.

    Subclasses say which texts a valid body holds (`texts`) and how to answer (`render`)."""

    endpoint = ""
    texts_param = "texts"
    permission_classes = [IsAuthenticated, HasActiveTenant]
    serializer_class: type[serializers.Serializer]
    call: MeteredCall | None = None

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        if request.method != "POST":
            # OPTIONS, or the browsable API's page: not an embed request, nothing to meter.
            self.call = None
            super().initial(request, *args, **kwargs)
            return
        runtime = get_runtime()
        call = self.call = MeteredCall(
            request=request,
            caller=None,
            endpoint=self.endpoint,
            request_id=getattr(request._request, "request_id", ""),
            model=runtime.encoder.name if runtime is not None else "",
        )
        # Authentication, tenant resolution and permissions: the identity layer's share.
        with call.timed("auth"):
            super().initial(request, *args, **kwargs)
        with call.timed("ratelimit"):
            call.limits = effective_limits(call.tenant)
            call.rate_limit = count_request(request=request, tenant=call.tenant, limits=call.limits)

    def perform_authentication(self, request: Request) -> None:
        super().perform_authentication(request)
        # Kept here, where authentication has just succeeded: finalize_response must never
        # trigger authentication itself (that would run outside DRF's error handling).
        if self.call is not None and isinstance(request.auth, accounts.Caller):
            self.call.caller = request.auth

    def finalize_response(
        self, request: Request, response: Response, *args: Any, **kwargs: Any
    ) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)
        call = self.call
        if call is None:
            return response
        error_type = ""
        if response.status_code >= 400:
            data = response.data if isinstance(response.data, dict) else {}
            error_type = str(data.get("error", {}).get("type", "error"))
        if call.caller is not None and not call.recorded:
            accounts.log_refusal(
                record=call.usage_record(status_code=response.status_code, error_type=error_type)
            )
            call.recorded = True
        if call.rate_limit is not None:
            for name, value in with_remaining_tokens(call.rate_limit).headers().items():
                response.headers.setdefault(name, value)
        response["Server-Timing"] = call.server_timing()
        status = str(response.status_code)
        metrics.REQUESTS.labels(endpoint=self.endpoint, status=status).inc()
        metrics.REQUEST_DURATION.labels(endpoint=self.endpoint).observe(call.elapsed_ms() / 1000)
        if response.status_code >= 400:
            metrics.ERRORS.labels(endpoint=self.endpoint, type=error_type).inc()
        return response

    def post(self, request: Request) -> Response:
        assert self.call is not None
        if not isinstance(request.data, dict):
            raise exceptions.ParseError(
                "The request body must be a JSON object.", code="invalid_body"
            )
        serializer = self.serializer_class(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        result = embed(
            call=self.call,
            texts=self.texts(data),
            prompt_name=data.get("prompt_name"),
            dimensions=data.get("dimensions"),
            normalize=data.get("normalize", True),
            param=self.texts_param,
        )
        return Response(self.render(result, data))

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
            "embedding": result.vectors[0].tolist(),
            "model": result.model,
            "dimensions": result.dimensions,
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
            "embeddings": result.vectors.tolist(),
            "model": result.model,
            "dimensions": result.dimensions,
            "usage": usage_of(result),
        }


class OpenAIEmbeddingsView(MeteredEmbedView):
    """OpenAI-compatible embeddings: the official `openai` client works unchanged with
    `base_url=http://host:port/v1`."""

    endpoint = "openai_embeddings"
    texts_param = "input"
    serializer_class = io.OpenAIEmbeddingInputSerializer
    name = "OpenAI embeddings"  # the browsable API's title ("Open Ai Embeddings" otherwise)

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
                "embedding": encode_base64(vector) if as_base64 else vector.tolist(),
            }
            for index, vector in enumerate(result.vectors)
        ]
        return {"object": "list", "data": items, "model": result.model, "usage": usage_of(result)}
