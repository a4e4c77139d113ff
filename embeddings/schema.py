"""The embeddings app in the OpenAPI document: /embed, /batch-embed, /v1/embeddings (and its
/embeddings alias) and /health.

What a request may hold depends on the model being served, so the constraints and the examples
are worked out each time the document is generated: the field extensions of
embeddings/schema_fields.py describe the request fields, and the view extensions below annotate
the views with examples that are valid for the served model. Without a loaded model
(`manage.py spectacular`), the examples show the production model.

Imported by embeddings/urls.py, which registers these extensions with drf-spectacular.

About 500 lines, most of them examples and descriptions: one block per endpoint, kept together
so that the document of each endpoint reads in one place.
"""

from __future__ import annotations

import copy
from typing import Any

from drf_spectacular.extensions import OpenApiViewExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema

from embeddings import serializers as io
from embeddings.schema_fields import PRODUCTION_MODEL, ServedModel, served_model
from embedplatform.error_codes import CATALOGUE
from embedplatform.errors import ErrorSerializer, openai_status
from embedplatform.schema import (
    RATE_LIMIT_HEADERS,
    REQUEST_ID_IN,
    REQUEST_ID_OUT,
    SERVER_TIMING,
    STATUS_DESCRIPTIONS,
    WWW_AUTHENTICATE,
    X_TENANT,
    error_responses,
)


# --- Examples valid for the served model ------------------------------------------------------
def shorter_dimensions(model: ServedModel) -> int:
    """A Matryoshka size the model has: the largest power of two below its own."""
    return 1 << max(0, model.dimensions - 1).bit_length() - 1


def prompt_option(model: ServedModel, preferred: str) -> dict[str, str]:
    if preferred in model.prompts:
        return {"prompt_name": preferred}
    return {"prompt_name": model.prompts[0]} if model.prompts else {}


EMBED_EXAMPLE: dict[str, Any] = {"text": "안녕하세요, 반갑습니다!"}
BATCH_EMBED_EXAMPLE: dict[str, Any] = {"texts": ["첫 번째", "두 번째", "세 번째"]}
OPENAI_EXAMPLE: dict[str, Any] = {"input": ["첫 번째", "두 번째", "세 번째"]}
TOKENIZE_EXAMPLE: dict[str, Any] = {"inputs": "안녕하세요, 반갑습니다!", "return_offsets": True}
DECODE_EXAMPLE: dict[str, Any] = {"ids": [[2, 9259]]}
FORM_EXAMPLES: dict[str, dict[str, Any]] = {
    "embed": EMBED_EXAMPLE,
    "batch_embed": BATCH_EMBED_EXAMPLE,
    "openai_embeddings": OPENAI_EXAMPLE,
    "tokenize": TOKENIZE_EXAMPLE,
    "decode": DECODE_EXAMPLE,
}


def form_example(endpoint: str) -> dict[str, Any]:
    """The body the browsable API's form starts from, for a view's `endpoint`."""
    return copy.deepcopy(FORM_EXAMPLES.get(endpoint, {}))


def _request_example(name: str, value: dict[str, Any]) -> OpenApiExample:
    return OpenApiExample(name, value=value, request_only=True)


def _response(serializer: Any, description: str, *examples: OpenApiExample) -> OpenApiResponse:
    return OpenApiResponse(response=serializer, description=description, examples=list(examples))


def openai_error_responses(*codes: str) -> dict[int, OpenApiResponse]:
    """As `error_responses`, with the statuses OpenAI's API gives them (400 for every invalid
    request, where the original API answers 422 or 413)."""
    descriptions = {
        **STATUS_DESCRIPTIONS,
        400: "An invalid request (OpenAI's status for it): a body that is not a JSON object, a "
        "missing or invalid field, more inputs than allowed, an input too long with `truncate: "
        "false`; `param` names the field and `code` says what is wrong.",
        413: "The body is larger than the server accepts (`DATA_UPLOAD_MAX_MEMORY_SIZE`).",
    }
    by_status: dict[int, list[OpenApiExample]] = {}
    for code in codes:
        body = CATALOGUE[code].example_body()
        status = openai_status(CATALOGUE[code].status, body)
        by_status.setdefault(status, []).append(OpenApiExample(CATALOGUE[code].title, value=body))
    return {
        status: OpenApiResponse(
            response=ErrorSerializer, description=descriptions[status], examples=examples
        )
        for status, examples in sorted(by_status.items())
    }


# --- Operations -------------------------------------------------------------------------------
TRUNCATED_INPUTS = OpenApiParameter(
    "x-truncated-inputs",
    OpenApiTypes.INT,
    OpenApiParameter.HEADER,
    response=[200],
    required=True,
    description="How many of the request's inputs were cut to the model's max_seq_length "
    "tokens (0: none). `usage` counts the tokens actually embedded.",
)
EMBED_HEADERS = [X_TENANT, REQUEST_ID_IN, REQUEST_ID_OUT, SERVER_TIMING, WWW_AUTHENTICATE]
EMBED_HEADERS += [*RATE_LIMIT_HEADERS, TRUNCATED_INPUTS]
EMBED_ERRORS = (
    "invalid_json",
    "invalid_body",
    "missing_credentials",
    "invalid_signature",
    "token_expired",
    "invalid_api_key",
    "not_a_member",
    "tenant_inactive",
    "tenant_mismatch",
    "permission_denied",
    "too_many_inputs",
    "request_too_large",
    "unsupported_media_type",
    "empty_text",
    "invalid",
    "invalid_dimensions",
    "invalid_prompt_name",
    "input_too_long",
    "rate_limit_exceeded",
    "insufficient_quota",
    "model_not_ready",
    "model_overloaded",
    "rate_limit_unavailable",
    "jwks_unavailable",
)
OPENAI_ERRORS = (*EMBED_ERRORS, "model_not_found", "invalid_token_id")


def _usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def embed_operation(model: ServedModel) -> dict[str, Any]:
    short = shorter_dimensions(model)
    return {
        "tags": ["Embeddings"],
        "summary": "Embed one text",
        "description": "Embeds `text` with the served model (EmbeddingGemma in production). "
        "`prompt_name` prepends one of the model's task prompts (see `GET /health`); "
        "`dimensions` keeps the first N dimensions (Matryoshka) and re-normalises. A text "
        "longer than the model reads is cut (`truncate`, default `TRUNCATE_INPUTS`; "
        "`truncation_direction`) and `truncated` says so, or refused with 422 "
        "`input_too_long` when `truncate` is false. The tokens embedded are charged to the "
        "tenant's quota.",
        "request": io.EmbedInputSerializer,
        "parameters": EMBED_HEADERS,
        "examples": [
            _request_example("Korean greeting", EMBED_EXAMPLE),
            _request_example(
                f"Search query, {short} dimensions",
                {
                    "text": "임베딩이란 무엇인가요?",
                    **prompt_option(model, "query"),
                    "dimensions": short,
                },
            ),
        ],
        "responses": {
            200: _response(
                io.EmbedOutputSerializer,
                "The embedding, unit length unless `normalize` is false.",
                OpenApiExample(
                    "Embedding (shortened)",
                    value={
                        "embedding": [0.0213, -0.0871, 0.0542, 0.0117],
                        "model": model.name,
                        "dimensions": model.dimensions,
                        "truncated": False,
                        "usage": _usage(9),
                    },
                ),
            ),
            **error_responses(*EMBED_ERRORS),
        },
    }


def batch_embed_operation(model: ServedModel) -> dict[str, Any]:
    documents = ["서울은 한국의 수도입니다.", "부산은 항구 도시입니다."]
    return {
        "tags": ["Embeddings"],
        "summary": "Embed many texts",
        "description": "Embeds every text of `texts` in one request; the answer keeps their "
        "order. At most the tenant's maximum texts per request (`MAX_TEXTS_PER_REQUEST`, 256 by "
        "default, or the tenant's lower limit; more is a 413). Options as for `/embed`, applied "
        "to every text.",
        "request": io.BatchEmbedInputSerializer,
        "parameters": EMBED_HEADERS,
        "examples": [
            _request_example("Three Korean texts", BATCH_EMBED_EXAMPLE),
            _request_example(
                "Documents for a search index",
                {
                    "texts": documents,
                    **prompt_option(model, "document"),
                    "dimensions": shorter_dimensions(model),
                },
            ),
        ],
        "responses": {
            200: _response(
                io.BatchEmbedOutputSerializer,
                "One embedding per text, in the order of `texts`.",
                OpenApiExample(
                    "Embeddings (shortened)",
                    value={
                        "embeddings": [[0.0213, -0.0871], [0.0412, 0.0038], [-0.0167, 0.0725]],
                        "model": model.name,
                        "dimensions": model.dimensions,
                        "truncated": [False, False, False],
                        "usage": _usage(12),
                    },
                ),
            ),
            **error_responses(*EMBED_ERRORS),
        },
    }


OPENAI_SUMMARY = "Create embeddings (OpenAI-compatible)"
OPENAI_DESCRIPTION = (
    "OpenAI's embeddings API: `openai.OpenAI(base_url='https://<host>/v1', "
    "api_key='<Supabase JWT or API key>').embeddings.create(model=..., input=...)` works "
    "unchanged, `encoding_format='base64'` (the client's default) included. `model` may be "
    "omitted; another model than the served one is a 404. Embeddings are always unit length. "
    "Besides OpenAI's fields, `prompt_name` selects a task prompt as on `/embed`, and "
    "`truncate`/`truncation_direction` say what happens to an input longer than the model "
    "reads (`x-truncated-inputs` counts the inputs cut). At most "
    "`OPENAI_MAX_INPUTS_PER_REQUEST` (2048) inputs, or the tenant's lower limit. As on "
    "OpenAI's API, every invalid request is a 400 (the original `/embed` and `/batch-embed` "
    "answer 422, and 413 for too many texts)."
)
ALIAS_PATH = "/embeddings"


class OpenAIEmbeddingsAutoSchema(AutoSchema):
    """Tells /embeddings, the alias for clients whose base URL has no /v1, from /v1/embeddings."""

    def get_summary(self) -> str:
        if self.path == ALIAS_PATH:
            return "Create embeddings (OpenAI-compatible, without /v1)"
        return OPENAI_SUMMARY

    # drf-spectacular calls it without arguments; the DRF stubs type the base class.
    def get_description(self) -> str:  # type: ignore[override]
        if self.path == ALIAS_PATH:
            return (
                "The same as `POST /v1/embeddings`, for OpenAI-compatible clients configured "
                f"with a base URL that has no `/v1`.\n\n{OPENAI_DESCRIPTION}"
            )
        return OPENAI_DESCRIPTION


def openai_operation(model: ServedModel) -> dict[str, Any]:
    item = {"object": "embedding", "index": 0}
    return {
        "tags": ["OpenAI-compatible"],
        "request": io.OpenAIEmbeddingInputSerializer,
        "parameters": EMBED_HEADERS,
        "examples": [
            _request_example("One text", {"input": "안녕하세요, 반갑습니다!", "model": model.name}),
            _request_example(
                f"Several texts, {shorter_dimensions(model)} dimensions",
                {
                    **OPENAI_EXAMPLE,
                    "model": model.name,
                    "encoding_format": "float",
                    "dimensions": shorter_dimensions(model),
                },
            ),
            _request_example(
                "As the openai client sends it",
                {
                    "input": ["The quick brown fox"],
                    "model": model.name,
                    "encoding_format": "base64",
                },
            ),
        ],
        "responses": {
            200: _response(
                io.OpenAIEmbeddingOutputSerializer,
                "OpenAI's list of embeddings, in the order of `input`.",
                OpenApiExample(
                    "Floats (shortened)",
                    value={
                        "object": "list",
                        "data": [
                            {**item, "embedding": [0.0213, -0.0871]},
                            {**item, "index": 1, "embedding": [0.0412, 0.0038]},
                        ],
                        "model": model.name,
                        "usage": _usage(8),
                    },
                ),
                OpenApiExample(
                    "base64 (shortened)",
                    value={
                        "object": "list",
                        "data": [{**item, "embedding": "ckSuPDJlsr0="}],
                        "model": model.name,
                        "usage": _usage(6),
                    },
                ),
            ),
            **openai_error_responses(*OPENAI_ERRORS),
        },
    }


TOKENIZER_ERRORS = (
    "invalid_json",
    "invalid_body",
    "missing_credentials",
    "invalid_api_key",
    "not_a_member",
    "tenant_inactive",
    "too_many_inputs",
    "request_too_large",
    "unsupported_media_type",
    "empty_text",
    "invalid",
    "rate_limit_exceeded",
    "model_not_ready",
    "rate_limit_unavailable",
)
TOKENIZER_HEADERS = [X_TENANT, REQUEST_ID_IN, REQUEST_ID_OUT, SERVER_TIMING, WWW_AUTHENTICATE]
TOKENIZER_HEADERS += RATE_LIMIT_HEADERS


def tokenize_operation(model: ServedModel) -> dict[str, Any]:
    return {
        "tags": ["Tokenizer"],
        "summary": "Tokenize texts",
        "description": "The served model's tokenizer, as text-embeddings-inference offers it: "
        "each text's token ids, whole (never truncated), and with `return_offsets` each "
        "token's text and character offsets; `max_seq_length` is how many tokens per input the "
        "model reads. For chunking text to the model's limit before embedding it. Counts "
        "against requests per minute and is logged; charged no tokens.",
        "request": io.TokenizeInputSerializer,
        "parameters": TOKENIZER_HEADERS,
        "examples": [
            _request_example("With offsets", TOKENIZE_EXAMPLE),
            _request_example("Several texts", {"inputs": ["첫 번째", "두 번째"]}),
        ],
        "responses": {
            200: _response(
                io.TokenizeOutputSerializer,
                "Token ids per text, in order.",
                OpenApiExample(
                    "With offsets (shortened)",
                    value={
                        "data": [
                            {
                                "ids": [2, 9259],
                                "pieces": [
                                    {"id": 2, "text": "", "special": True, "start": 0, "stop": 0},
                                    {
                                        "id": 9259,
                                        "text": "안녕",
                                        "special": False,
                                        "start": 0,
                                        "stop": 2,
                                    },
                                ],
                            }
                        ],
                        "model": model.name,
                        "max_seq_length": model.max_seq_length,
                    },
                ),
            ),
            **error_responses(*TOKENIZER_ERRORS),
        },
    }


def decode_operation(model: ServedModel) -> dict[str, Any]:
    return {
        "tags": ["Tokenizer"],
        "summary": "Decode token ids",
        "description": "Text of each list of token ids of the served model (special tokens "
        "left out), as text-embeddings-inference's /decode. Counts against requests per minute "
        "and is logged; charged no tokens.",
        "request": io.DecodeInputSerializer,
        "parameters": TOKENIZER_HEADERS,
        "examples": [
            _request_example("One text", {"ids": [2, 9259]}),
            _request_example("Several texts", {"ids": [[2, 9259], [2, 9259, 1]]}),
        ],
        "responses": {
            200: _response(
                io.DecodeOutputSerializer,
                "One text per id list, in order.",
                OpenApiExample("Texts", value={"texts": ["안녕"], "model": model.name}),
            ),
            **error_responses(*TOKENIZER_ERRORS, "invalid_token_id"),
        },
    }


def health_operation(model: ServedModel) -> dict[str, Any]:
    from embeddings.health import HealthSerializer

    not_ready = error_responses("not_ready")[503]
    return {
        "tags": ["Operations"],
        "summary": "Readiness",
        "description": "Ready (200) when the model is loaded and the database, and Redis where "
        "configured, answer; otherwise 503 with what is failing. Needs no credential: load "
        "balancers and Docker's HEALTHCHECK call it.",
        "parameters": [REQUEST_ID_OUT],
        "responses": {
            200: _response(
                HealthSerializer,
                "Ready.",
                OpenApiExample(
                    "Ready",
                    value={
                        "status": "ok",
                        "checks": {"model": "ok", "database": "ok", "redis": "ok"},
                        "model": model.name,
                        "dimensions": model.dimensions,
                        "dtype": model.dtype,
                        "max_seq_length": model.max_seq_length,
                        "prompts": list(model.prompts),
                    },
                ),
            ),
            503: _response(
                HealthSerializer,
                "Not ready; `checks` and `error` say why.",
                *[
                    OpenApiExample(
                        "Model still loading",
                        value={
                            "status": "unavailable",
                            "checks": {"model": "not loaded", "database": "ok", "redis": "ok"},
                            **example.value,
                        },
                    )
                    for example in not_ready.examples
                ],
            ),
        },
    }


class _DescribedView(OpenApiViewExtension):
    """Annotates a view, at each generation, with the operation built for the served model."""

    auto_schema_class: type[AutoSchema] = AutoSchema

    def operation(self, model: ServedModel) -> dict[str, Any]:
        raise NotImplementedError

    def view_replacement(self) -> type:
        described = type(self.target.__name__, (self.target,), {"schema": self.auto_schema_class()})
        model = served_model() or PRODUCTION_MODEL
        return extend_schema(**self.operation(model))(described)


class EmbedViewSchema(_DescribedView):
    target_class = "embeddings.views.EmbedView"

    def operation(self, model: ServedModel) -> dict[str, Any]:
        return embed_operation(model)


class BatchEmbedViewSchema(_DescribedView):
    target_class = "embeddings.views.BatchEmbedView"

    def operation(self, model: ServedModel) -> dict[str, Any]:
        return batch_embed_operation(model)


class OpenAIEmbeddingsViewSchema(_DescribedView):
    target_class = "embeddings.views.OpenAIEmbeddingsView"
    auto_schema_class = OpenAIEmbeddingsAutoSchema

    def operation(self, model: ServedModel) -> dict[str, Any]:
        return openai_operation(model)


class TokenizeViewSchema(_DescribedView):
    target_class = "embeddings.tokenizer_api.TokenizeView"

    def operation(self, model: ServedModel) -> dict[str, Any]:
        return tokenize_operation(model)


class DecodeViewSchema(_DescribedView):
    target_class = "embeddings.tokenizer_api.DecodeView"

    def operation(self, model: ServedModel) -> dict[str, Any]:
        return decode_operation(model)


class HealthViewSchema(_DescribedView):
    target_class = "embeddings.health.HealthView"

    def operation(self, model: ServedModel) -> dict[str, Any]:
        return health_operation(model)
