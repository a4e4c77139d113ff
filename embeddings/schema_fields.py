"""The served model's limits in the OpenAPI document: drf-spectacular field extensions for the
fields of embeddings/serializers.py whose constraints depend on the model being served (its
dimensions, prompt names, names and vocabulary) or on MAX_TEXTS_PER_REQUEST, worked out each time
the document is generated. Without a loaded model (`manage.py spectacular`) those constraints are
left open. Registered by importing embeddings.schema, which imports this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from drf_spectacular.openapi import AutoSchema

from embeddings import serializers as io
from embeddings.runtime import accepted_model_names, get_runtime


@dataclass(frozen=True)
class ServedModel:
    name: str
    dimensions: int
    prompts: tuple[str, ...]
    vocab_size: int
    max_seq_length: int
    dtype: str


# What the examples show when no model is loaded: EmbeddingGemma, as in production.
PRODUCTION_MODEL = ServedModel(
    name="google/embeddinggemma-300m",
    dimensions=768,
    prompts=("Classification", "Clustering", "STS", "document", "query"),
    vocab_size=262144,
    max_seq_length=2048,
    dtype="int8",
)


def served_model() -> ServedModel | None:
    runtime = get_runtime()
    if runtime is None:
        return None
    encoder = runtime.encoder
    return ServedModel(
        name=encoder.name,
        dimensions=encoder.dimensions,
        prompts=tuple(sorted(encoder.prompts)),
        vocab_size=encoder.vocab_size,
        max_seq_length=encoder.max_seq_length,
        dtype=encoder.dtype,
    )


# --- Fields whose limits come from the served model or the settings ---------------------------
class DimensionsSchema(OpenApiSerializerFieldExtension):
    target_class = "embeddings.serializers.DimensionsField"

    def map_serializer_field(self, auto_schema: AutoSchema, direction: str) -> dict[str, Any]:
        model = served_model()
        limit = {"maximum": model.dimensions} if model else {}
        return {"type": "integer", "minimum": 1, **limit}


class PromptNameSchema(OpenApiSerializerFieldExtension):
    target_class = "embeddings.serializers.PromptNameField"

    def map_serializer_field(self, auto_schema: AutoSchema, direction: str) -> dict[str, Any]:
        model = served_model()
        schema: dict[str, Any] = {"type": "string", "maxLength": self.target.max_length}
        if model is not None and model.prompts:
            schema["enum"] = list(model.prompts)
        elif model is not None:
            # A model without prompts takes no name: only null, or leaving the field out.
            schema = {"not": {}}
        return schema


class ModelNameSchema(OpenApiSerializerFieldExtension):
    target_class = "embeddings.serializers.ModelNameField"

    def map_serializer_field(self, auto_schema: AutoSchema, direction: str) -> dict[str, Any]:
        model = served_model()
        schema: dict[str, Any] = {"type": "string", "maxLength": self.target.max_length}
        if model is not None:
            schema["enum"] = sorted(accepted_model_names(model.name))
        return schema


def _texts_schema(most: int | None = None) -> dict[str, Any]:
    return {
        "type": "array",
        "items": io.TEXT_SCHEMA,
        "minItems": 1,
        "maxItems": settings.MAX_TEXTS_PER_REQUEST if most is None else most,
    }


class TextListSchema(OpenApiSerializerFieldExtension):
    target_class = "embeddings.serializers.TextListField"

    def map_serializer_field(self, auto_schema: AutoSchema, direction: str) -> dict[str, Any]:
        return _texts_schema()


class OpenAIInputSchema(OpenApiSerializerFieldExtension):
    target_class = "embeddings.serializers.OpenAIInputField"

    def map_serializer_field(self, auto_schema: AutoSchema, direction: str) -> dict[str, Any]:
        model = served_model()
        token_id: dict[str, Any] = {"type": "integer", "minimum": 0}
        if model is not None:
            token_id["maximum"] = model.vocab_size - 1
        token_ids = {"type": "array", "items": token_id, "minItems": 1}
        most = settings.OPENAI_MAX_INPUTS_PER_REQUEST  # OpenAI's ceiling, not the original API's
        return {
            "oneOf": [
                {**io.TEXT_SCHEMA, "description": "One text."},
                {**_texts_schema(most), "description": "Several texts."},
                {**token_ids, "description": "One text as token ids."},
                {
                    "type": "array",
                    "items": token_ids,
                    "minItems": 1,
                    "maxItems": most,
                    "description": "Several texts as token ids.",
                },
            ],
        }


class TokenizeInputsSchema(OpenApiSerializerFieldExtension):
    target_class = "embeddings.serializers.TokenizeInputsField"

    def map_serializer_field(self, auto_schema: AutoSchema, direction: str) -> dict[str, Any]:
        return {
            "oneOf": [
                {**io.TEXT_SCHEMA, "description": "One text."},
                {**_texts_schema(), "description": "Several texts."},
            ]
        }


class DecodeIdsSchema(OpenApiSerializerFieldExtension):
    target_class = "embeddings.serializers.DecodeIdsField"

    def map_serializer_field(self, auto_schema: AutoSchema, direction: str) -> dict[str, Any]:
        model = served_model()
        token_id: dict[str, Any] = {"type": "integer", "minimum": 0}
        if model is not None:
            token_id["maximum"] = model.vocab_size - 1
        token_ids = {"type": "array", "items": token_id, "minItems": 1}
        return {
            "oneOf": [
                {**token_ids, "description": "One text's token ids."},
                {
                    "type": "array",
                    "items": token_ids,
                    "minItems": 1,
                    "maxItems": settings.MAX_TEXTS_PER_REQUEST,
                    "description": "Several texts' token ids.",
                },
            ]
        }
