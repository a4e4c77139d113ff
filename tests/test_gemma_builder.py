"""Tests for the offline EmbeddingGemma look-alike builder (no DB, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from bench.gemma_builder import EMBEDDING_GEMMA_PROMPTS, build_gemma_like_model, main


@pytest.fixture(scope="module")
def tiny_gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gemma_like_model(tmp_path_factory.mktemp("gemma") / "tiny", size="tiny")


@pytest.fixture(scope="module")
def tiny_gemma(tiny_gemma_path: Path) -> SentenceTransformer:
    return SentenceTransformer(str(tiny_gemma_path), device="cpu", local_files_only=True)


def test_it_builds_a_loadable_sentence_transformer_directory(tiny_gemma_path: Path) -> None:
    for name in (
        "modules.json",
        "config.json",
        "config_sentence_transformers.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (tiny_gemma_path / name).is_file(), name
    size_mb = sum(p.stat().st_size for p in tiny_gemma_path.rglob("*") if p.is_file()) / 2**20
    assert size_mb < 20


def test_it_has_embedding_gemma_architecture(tiny_gemma: SentenceTransformer) -> None:
    from transformers import Gemma3TextModel

    assert [type(module).__name__ for module in tiny_gemma] == [
        "Transformer",
        "Pooling",
        "Dense",
        "Dense",
        "Normalize",
    ]
    backbone = tiny_gemma[0].auto_model
    assert isinstance(backbone, Gemma3TextModel)
    config = backbone.config
    assert config.model_type == "gemma3_text"
    assert config.use_bidirectional_attention is True
    assert config.num_attention_heads == 3
    assert config.num_key_value_heads == 1
    assert {"sliding_attention", "full_attention"} <= set(config.layer_types or ())
    assert tiny_gemma.max_seq_length == config.max_position_embeddings

    pooling = tiny_gemma[1]
    assert pooling.pooling_mode == "mean"
    assert pooling.include_prompt is True
    up, down = tiny_gemma[2], tiny_gemma[3]
    assert (up.in_features, up.out_features) == (config.hidden_size, 4 * config.hidden_size)
    assert (down.in_features, down.out_features) == (4 * config.hidden_size, config.hidden_size)
    assert up.linear.bias is None
    assert down.linear.bias is None
    assert isinstance(up.activation_function, torch.nn.Identity)
    assert isinstance(down.activation_function, torch.nn.Identity)


def test_it_saves_embedding_gemma_prompts(
    tiny_gemma_path: Path, tiny_gemma: SentenceTransformer
) -> None:
    saved = json.loads((tiny_gemma_path / "config_sentence_transformers.json").read_text())
    assert saved["prompts"] == EMBEDDING_GEMMA_PROMPTS
    assert saved["default_prompt_name"] is None
    assert saved["similarity_fn_name"] == "cosine"
    assert tiny_gemma.prompts == EMBEDDING_GEMMA_PROMPTS
    assert tiny_gemma.default_prompt_name is None


def test_it_tokenizes_with_gemma_special_tokens(tiny_gemma: SentenceTransformer) -> None:
    tokenizer = tiny_gemma.tokenizer
    assert tokenizer.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<unk>"]) == [0, 1, 2, 3]
    ids = tokenizer("안녕하세요 👋 world")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 2
    assert ids[-1] == tokenizer.eos_token_id == 1
    assert tokenizer.unk_token_id not in ids
    assert len(tokenizer) <= tiny_gemma[0].auto_model.config.vocab_size


def test_it_embeds_multilingual_text_to_unit_vectors(tiny_gemma: SentenceTransformer) -> None:
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "오늘 서울의 날씨는 맑습니다.",
        "🚀🔥😀👩‍💻🇰🇷",
        "Mixed 한국어 and English 東京 😀 text",
        "ꙮ 𓀀 🜁 — unusual code points never seen in training",
        "",
    ]
    embeddings = tiny_gemma.encode(texts)
    dim = tiny_gemma[0].auto_model.config.hidden_size
    assert embeddings.dtype == np.float32
    assert embeddings.shape == (len(texts), dim)
    assert tiny_gemma.get_embedding_dimension() == dim
    assert np.all(np.isfinite(embeddings))
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    cosine = embeddings @ embeddings.T
    off_diagonal = cosine[~np.eye(len(texts), dtype=bool)]
    # A degenerate random init would map everything to nearly the same vector.
    assert off_diagonal.max() < 0.95


def test_it_applies_prompts(tiny_gemma: SentenceTransformer) -> None:
    plain = tiny_gemma.encode(["capital of Korea"])
    query = tiny_gemma.encode(["capital of Korea"], prompt_name="query")
    assert float(plain[0] @ query[0]) < 0.999


def test_it_is_deterministic(tiny_gemma: SentenceTransformer, tmp_path: Path) -> None:
    again = SentenceTransformer(str(build_gemma_like_model(tmp_path / "again")), device="cpu")
    texts = ["same seed, same weights", "같은 시드"]
    np.testing.assert_allclose(tiny_gemma.encode(texts), again.encode(texts), atol=1e-6)


def test_it_attends_bidirectionally(tiny_gemma: SentenceTransformer) -> None:
    backbone = tiny_gemma[0].auto_model
    tokenizer = tiny_gemma.tokenizer
    base = tokenizer("the weather in Seoul is sunny", return_tensors="pt")["input_ids"]
    changed = base.clone()
    # Replace the last content token (just before <eos>) with another one.
    changed[0, -2] = tokenizer.convert_tokens_to_ids("<unk>")
    with torch.inference_mode():
        first_base = backbone(input_ids=base).last_hidden_state[0, 0]
        first_changed = backbone(input_ids=changed).last_hidden_state[0, 0]
    # With a causal mask the first position could not see the change at all.
    assert not torch.allclose(first_base, first_changed, atol=1e-5)


def test_it_builds_through_the_cli(tmp_path: Path) -> None:
    assert main([str(tmp_path / "cli"), "--size", "tiny"]) == 0
    model = SentenceTransformer(str(tmp_path / "cli"), device="cpu")
    assert model.encode(["hi"]).shape == (1, model.get_embedding_dimension())


def test_it_rejects_unknown_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        build_gemma_like_model(tmp_path / "x", size="huge")  # type: ignore[arg-type]  # refused on purpose


def test_it_builds_a_minimal_one_layer_model_for_the_stack_ceiling(tmp_path: Path) -> None:
    model = SentenceTransformer(
        str(build_gemma_like_model(tmp_path / "minimal", size="minimal")), device="cpu"
    )
    config = model[0].auto_model.config
    assert [type(module).__name__ for module in model] == [
        "Transformer",
        "Pooling",
        "Dense",
        "Dense",
        "Normalize",
    ]
    assert config.model_type == "gemma3_text"
    assert config.num_hidden_layers == 1
    assert config.hidden_size < 96  # smaller than "tiny" in every dimension that costs
    embeddings = model.encode(["a search query", "검색어"])
    assert embeddings.shape == (2, config.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
