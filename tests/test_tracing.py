"""The model's backbone runs as a traced graph where, and only where, that gives the eager
model's embeddings (embeddings/tracing.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.test import override_settings

from embeddings import encoder as encoder_module
from embeddings.encoder import SentenceTransformerEncoder

TEXTS = [
    "",
    "a short query",
    "a longer document about embeddings, tenants and quotas " * 20,  # past the sliding window
    "x",
]


def eager_and_traced(
    encoder: SentenceTransformerEncoder, texts: list[str], prompt: str
) -> tuple[np.ndarray, np.ndarray]:
    tokenized = encoder.tokenize(texts, prompt=prompt)
    traced = encoder.encode_tokenized(tokenized.inputs, prompt)
    eager = replace(encoder, traced=None).encode_tokenized(tokenized.inputs, prompt)
    return eager, traced


def test_it_traces_the_embeddinggemma_architecture_and_embeds_exactly_as_eager(
    gemma_encoder: SentenceTransformerEncoder,
) -> None:
    assert gemma_encoder.traced is not None
    for prompt in ("", gemma_encoder.prompts["query"], gemma_encoder.prompts["document"]):
        eager, traced = eager_and_traced(gemma_encoder, TEXTS, prompt)
        np.testing.assert_allclose(traced, eager, rtol=1e-5, atol=1e-6)


def test_it_embeds_as_sentence_transformers_does_through_the_traced_graph(
    gemma_encoder: SentenceTransformerEncoder, minilm_encoder: SentenceTransformerEncoder
) -> None:
    for encoder in (gemma_encoder, minilm_encoder):
        assert encoder.traced is not None
        ours = encoder.encode(TEXTS[1:], "")
        reference = encoder.model.encode(TEXTS[1:], convert_to_numpy=True)
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quantization", ["int8", "bf16"])
def test_it_traces_quantized_models_too(gemma_tiny_path: Path, quantization: str) -> None:
    encoder = encoder_module.load_encoder(
        model_name=str(gemma_tiny_path),
        quantization=quantization,
        max_seq_length=512,
        hf_token=None,
        trace=True,
    )
    assert encoder.traced is not None
    eager, traced = eager_and_traced(encoder, TEXTS, encoder.prompts["query"])
    np.testing.assert_allclose(traced, eager, rtol=1e-4, atol=1e-5)


def test_it_stays_eager_when_the_traced_graph_would_differ_for_other_shapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The hazard of tracing: Python that branches on a shape is frozen to the example's branch.
    encoder = encoder_module.load_encoder(
        model_name="", quantization="fp32", max_seq_length=256, hf_token=None, trace=False
    )
    backbone = next(iter(encoder.model.children())).model
    forward = backbone.forward

    def branches_on_length(*args: Any, **kwargs: Any) -> Any:
        output = forward(*args, **kwargs)
        if int(kwargs["input_ids"].shape[1]) > 5:  # traced as a constant
            if isinstance(output, tuple):  # return_dict=False, as traced
                return (output[0] + 1.0, *output[1:])
            output["last_hidden_state"] = output["last_hidden_state"] + 1.0
        return output

    monkeypatch.setattr(backbone, "forward", branches_on_length)
    outcome = encoder.trace()
    assert encoder.traced is None
    assert outcome.startswith("eager: TraceMismatch")
    assert "(2,) tokens" in outcome  # the two-token check is where the frozen branch shows
    assert encoder.encode(["still served, eagerly"], "").shape == (1, 384)


def test_it_runs_eagerly_when_tracing_is_switched_off() -> None:
    with override_settings(MODEL_TRACE=False):
        encoder = encoder_module.load_encoder(
            model_name="", quantization="fp32", max_seq_length=256, hf_token=None
        )
    assert encoder.traced is None


def test_it_holds_the_whole_model_in_the_graph_where_every_module_can_be_traced(
    gemma_encoder: SentenceTransformerEncoder, minilm_encoder: SentenceTransformerEncoder
) -> None:
    # Pooling, both Dense layers and Normalize: each op outside the graph waits for the GIL.
    for encoder in (gemma_encoder, minilm_encoder):
        assert encoder.traced is not None
        assert encoder.traced.output == "sentence_embedding"


def test_it_leaves_a_pooling_that_skips_the_prompt_outside_the_graph() -> None:
    # Such a pooling reads the prompt's length, a number per request that a graph would freeze.
    encoder = encoder_module.load_encoder(
        model_name="", quantization="fp32", max_seq_length=256, hf_token=None, trace=False
    )
    pooling = list(encoder.model.children())[1]
    pooling.include_prompt = False
    assert encoder.trace() == "traced"
    assert encoder.traced is not None
    assert encoder.traced.output == "token_embeddings"
    for prompt in ("query: ", "a much longer instruction before the text: "):
        eager, traced = eager_and_traced(encoder, TEXTS[1:], prompt)
        np.testing.assert_allclose(traced, eager, rtol=1e-5, atol=1e-6)
