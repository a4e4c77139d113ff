"""The ready-made attention masks of bidirectional Gemma3 encoders (embeddings/attention_masks.py)
are transformers' own masks, and the encoder uses them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from embeddings import attention_masks
from embeddings.encoder import SentenceTransformerEncoder


def backbone_of(encoder: SentenceTransformerEncoder) -> Any:
    return next(iter(encoder.model.children())).model


def transformers_masks(backbone: Any, padding_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The masks Gemma3TextModel.forward builds for itself, captured from its decoder layers."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for layer, kind in zip(backbone.layers, backbone.config.layer_types, strict=False):

        def capture(_module: Any, _args: Any, kwargs: dict[str, Any], kind: str = kind) -> None:
            seen[kind] = kwargs["attention_mask"]

        hooks.append(layer.register_forward_pre_hook(capture, with_kwargs=True))
    try:
        with torch.inference_mode():
            ids = torch.ones(padding_mask.shape, dtype=torch.long)
            backbone(input_ids=ids, attention_mask=padding_mask)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("length", [5, 70, 150])  # inside, around and past the sliding window
def test_it_builds_the_masks_transformers_builds(
    gemma_encoder: SentenceTransformerEncoder, length: int
) -> None:
    backbone = backbone_of(gemma_encoder)
    # The builder's window is 64; bidirectional Gemma3 configs keep half of it on each side.
    assert backbone.config.sliding_window == 33
    padding_mask = torch.ones((3, length), dtype=torch.long)
    padding_mask[1, length // 2 :] = 0  # right padding
    padding_mask[2, : length // 3] = 0  # left padding
    expected = transformers_masks(backbone, padding_mask)
    ours = attention_masks.bidirectional_masks(backbone, padding_mask, torch.float32)
    assert set(ours) == set(expected) == {"full_attention", "sliding_attention"}
    for kind, mask in ours.items():
        reference = expected[kind]
        assert reference is not None
        assert reference.dtype == torch.bool
        assert mask.shape == reference.shape
        assert torch.equal(mask, reference), kind


def test_it_gives_the_eager_implementation_an_additive_mask(
    gemma_encoder: SentenceTransformerEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = backbone_of(gemma_encoder)
    padding_mask = torch.tensor([[1, 1, 0]])
    monkeypatch.setattr(backbone.config, "_attn_implementation", "eager")
    masks = attention_masks.bidirectional_masks(backbone, padding_mask, torch.bfloat16)
    full = masks["full_attention"]
    assert full.dtype == torch.bfloat16
    assert full[0, 0, 0].tolist() == [0.0, 0.0, torch.finfo(torch.bfloat16).min]


def test_it_takes_the_fast_path_only_for_bidirectional_gemma3(
    gemma_encoder: SentenceTransformerEncoder,
    minilm_encoder: SentenceTransformerEncoder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backbone = backbone_of(gemma_encoder)
    assert attention_masks.supports_fast_masks(backbone)
    assert not attention_masks.supports_fast_masks(backbone_of(minilm_encoder))
    monkeypatch.setattr(backbone.config, "use_bidirectional_attention", False)
    assert not attention_masks.supports_fast_masks(backbone)
    monkeypatch.setattr(backbone.config, "use_bidirectional_attention", True)
    monkeypatch.setattr(backbone.config, "_attn_implementation", "flex_attention")
    assert not attention_masks.supports_fast_masks(backbone)


def test_it_encodes_as_sentence_transformers_does_with_the_masks_it_builds(
    gemma_encoder: SentenceTransformerEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    build = attention_masks.bidirectional_masks

    def counted(*args: Any) -> Any:
        calls.append(args)
        return build(*args)

    monkeypatch.setattr("embeddings.encoder.bidirectional_masks", counted)
    eager = replace(gemma_encoder, traced=None)  # the traced graph builds them inside itself
    texts = ["a short query", "a longer document about embeddings and tenants " * 12, "x"]
    prompt = gemma_encoder.prompts["document"]
    ours = eager.encode(texts, prompt)
    reference = gemma_encoder.model.encode(texts, prompt=prompt, convert_to_numpy=True)
    assert len(calls) == 1
    cosine = (ours * reference).sum(axis=1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
    )
    assert cosine.min() >= 0.9999
