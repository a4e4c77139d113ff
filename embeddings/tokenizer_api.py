"""POST /tokenize and POST /decode: the served model's tokenizer, as text-embeddings-inference
offers it, for clients that chunk text to the model's limit before sending it.

Metered like the embed APIs (authenticated, counted against requests per minute, one usage row
each) but charged no tokens: no model work is done."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rest_framework import exceptions
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import BrowsableAPIRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from accounts.metering.views import MeteredAPIView
from accounts.permissions import HasActiveTenant
from embeddings import serializers as io
from embeddings.renderers import VectorJSONRenderer
from embeddings.runtime import get_runtime
from embeddings.services import decode_ids, tokenize_texts
from embedplatform.browsable import BrowsableForm


class TokenizerView(BrowsableForm, MeteredAPIView):
    permission_classes = [IsAuthenticated, HasActiveTenant]
    renderer_classes = [VectorJSONRenderer, BrowsableAPIRenderer]

    def served_model(self) -> str:
        runtime = get_runtime()
        return runtime.encoder.name if runtime is not None else ""

    def valid_body(self, request: Request) -> dict[str, Any]:
        if not isinstance(request.data, dict):
            raise exceptions.ParseError(
                "The request body must be a JSON object.", code="invalid_body"
            )
        serializer = self.serializer_class(data=request.data)
        serializer.is_valid(raise_exception=True)
        return dict(serializer.validated_data)


class TokenizeView(TokenizerView):
    """Token ids of each text (`inputs`: a text or a list) with the served model's tokenizer,
    and with `return_offsets` each token's text and character offsets."""

    endpoint = "tokenize"
    serializer_class = io.TokenizeInputSerializer

    def post(self, request: Request) -> Response:
        data = self.valid_body(request)
        assert self.meter is not None
        runtime, rows = tokenize_texts(
            meter=self.meter, texts=data["inputs"], add_special_tokens=data["add_special_tokens"]
        )
        items: list[dict[str, Any]] = []
        for pieces in rows:
            item: dict[str, Any] = {"ids": [piece.id for piece in pieces]}
            if data["return_offsets"]:
                item["pieces"] = [asdict(piece) for piece in pieces]
            items.append(item)
        return Response(
            {
                "data": items,
                "model": runtime.encoder.name,
                "max_seq_length": runtime.encoder.max_seq_length,
            }
        )


class DecodeView(TokenizerView):
    """Text of each list of token ids of the served model (special tokens left out)."""

    endpoint = "decode"
    serializer_class = io.DecodeInputSerializer

    def post(self, request: Request) -> Response:
        data = self.valid_body(request)
        assert self.meter is not None
        runtime, texts = decode_ids(meter=self.meter, rows=data["ids"])
        return Response({"texts": texts, "model": runtime.encoder.name})
