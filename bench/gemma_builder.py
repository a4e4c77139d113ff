"""Offline builder for a randomly initialised EmbeddingGemma-300m look-alike.

The real ``google/embeddinggemma-300m`` is gated on the Hugging Face hub and cannot be downloaded in
CI or in this sandbox, yet the service must be tested (quantization, prompts, bidirectional
attention, memory) against exactly that architecture. This module rebuilds the architecture with
random weights and a locally trained tokenizer, and saves it as a regular SentenceTransformer
directory, so every code path that loads EmbeddingGemma by path can be exercised offline.

Usage::

    .venv/bin/python bench/gemma_builder.py PATH [--size minimal|tiny|full] [--seed 0] [--force]

Tests build the tiny size in a temporary folder; ``bench/build_full_gemma.py`` builds the full
size once for benchmarks.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import Gemma3TextConfig, PreTrainedTokenizerFast

__all__ = [
    "EMBEDDING_GEMMA_PROMPTS",
    "SPECIAL_TOKENS",
    "GemmaSize",
    "build_gemma_like_model",
    "build_tokenizer",
    "main",
]

GemmaSize = Literal["minimal", "tiny", "full"]

# Copied from EmbeddingGemma's config_sentence_transformers.json so prompt handling in the
# service is tested against the real prompt names and texts.
EMBEDDING_GEMMA_PROMPTS: dict[str, str] = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "BitextMining": "task: search result | query: ",
    "Clustering": "task: clustering | query: ",
    "Classification": "task: classification | query: ",
    "InstructionRetrieval": "task: code retrieval | query: ",
    "MultilabelClassification": "task: classification | query: ",
    "PairClassification": "task: sentence similarity | query: ",
    "Reranking": "task: search result | query: ",
    "Retrieval": "task: search result | query: ",
    "Retrieval-query": "task: search result | query: ",
    "Retrieval-document": "title: none | text: ",
    "STS": "task: sentence similarity | query: ",
    "Summarization": "task: summarization | query: ",
}

# Gemma's special-token ids (pad=0, eos=1, bos=2, unk=3) so configs match the real model.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>")

# Trained BPE vocabulary cap; a small in-process corpus cannot produce many more merges anyway.
_TOKENIZER_VOCAB_SIZE = 4096


@dataclass(frozen=True)
class _Spec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    sliding_window: int
    max_position_embeddings: int
    dense_size: int
    sliding_window_pattern: int


# Same ratios (3 query heads sharing 1 KV head, FFN 1.5x hidden, dense 4x hidden) but small
# enough to build in about a second. hidden must be divisible by the 3 heads (config check).
# The pattern of 2 keeps both sliding and full-attention layers in only 4 layers, and the
# window is small so long test inputs actually exercise the sliding-window mask.
_TINY = _Spec(
    vocab_size=_TOKENIZER_VOCAB_SIZE,
    hidden_size=96,
    intermediate_size=144,
    num_hidden_layers=4,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=32,
    sliding_window=64,
    max_position_embeddings=512,
    dense_size=384,
    sliding_window_pattern=2,
)


_SPECS: dict[str, _Spec] = {
    # Exactly google/embeddinggemma-300m.
    "full": _Spec(
        vocab_size=262_144,
        hidden_size=768,
        intermediate_size=1152,
        num_hidden_layers=24,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
        max_position_embeddings=2048,
        dense_size=3072,
        sliding_window_pattern=6,
    ),
    "tiny": _TINY,
    # The stack ceiling's near-free encoder (bench/service.py --ceiling): "tiny" cut to one
    # sliding-attention layer, 8 wide per head. "tiny" is not near-free on a CPU: a traced pass
    # of 8 short queries costs about 7 ms (~0.9 ms a text, a fifth of a metered request),
    # "minimal" about 0.9 ms.
    "minimal": replace(
        _TINY,
        hidden_size=24,
        intermediate_size=36,
        num_hidden_layers=1,
        head_dim=8,
        dense_size=96,
    ),
}

# Training text for the tokenizer. Byte-level BPE can encode any input regardless of this corpus;
# the corpus only decides which merges exist, so it covers the scripts the service cares about
# (English, Korean) plus a spread of others so their tokens are not all single bytes.
_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map sentences to vectors so that similar meanings end up close together.",
    "Search results are ranked by the cosine similarity between the query and each document.",
    "The service returns normalised float32 vectors for every input text.",
    "Please summarise the following article about climate change and renewable energy.",
    "How do I reset my password if I no longer have access to my email account?",
    "Machine learning models need careful evaluation on data they have never seen before.",
    "The weather in Seoul is sunny today, with a high of 24 degrees Celsius.",
    "Quantization reduces memory usage and speeds up inference on commodity CPUs.",
    "task: search result | query: what is the capital of South Korea?",
    "title: none | text: Seoul is the capital and largest city of South Korea.",
    "task: clustering | query: task: classification | query: task: sentence similarity | query:",
    "task: code retrieval | query: task: summarization | query: title: none | text:",
    "def encode(texts: list[str]) -> list[list[float]]: return model.encode(texts).tolist()",
    "SELECT id, title FROM documents WHERE created_at > NOW() - INTERVAL '7 days';",
    "Numbers like 3.14159, 2026, 1,000,000 and 42% appear in many documents.",
    "https://example.com/api/v1/embeddings?model=embeddinggemma&dim=768",
    "안녕하세요, 만나서 반갑습니다.",
    "오늘 서울의 날씨는 맑고 최고 기온은 24도입니다.",
    "임베딩은 문장을 벡터로 변환하여 의미가 비슷한 문장이 가까이 위치하도록 합니다.",
    "검색 결과는 질의와 문서 사이의 코사인 유사도로 정렬됩니다.",
    "비밀번호를 잊어버렸는데 어떻게 재설정할 수 있나요?",
    "한국어 자연어 처리는 형태소 분석과 띄어쓰기 문제 때문에 어렵습니다.",
    "대한민국의 수도는 서울이며 가장 큰 도시입니다.",
    "이 서비스는 모든 입력 텍스트에 대해 정규화된 벡터를 반환합니다.",
    "양자화는 메모리 사용량을 줄이고 CPU에서 추론 속도를 높입니다.",
    "회의는 내일 오후 세 시에 본사 회의실에서 열립니다.",
    "김치찌개와 된장찌개 중에서 무엇을 드시겠어요?",
    "가나다라마바사아자차카타파하 ㄱㄴㄷㄹㅁㅂㅅㅇㅈㅊㅋㅌㅍㅎ ㅏㅑㅓㅕㅗㅛㅜㅠㅡㅣ",
    "今日はいい天気ですね。東京タワーに行きましょう。",
    "ひらがな、カタカナ、そして漢字を使って日本語を書きます。",
    "我们使用向量来表示句子的含义。北京是中国的首都。",
    "El rápido zorro marrón salta sobre el perro perezoso.",
    "Le service renvoie des vecteurs normalisés pour chaque texte d'entrée.",
    "Die Einbettungen werden für die semantische Suche verwendet. Größe, Übung, Straße.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "الثعلب البني السريع يقفز فوق الكلب الكسول.",
    "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है।",
    "Γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλικο σκύλο.",
    "Emoji test: 😀 😂 🥲 😍 🤔 👍 🙏 🎉 🔥 ❤️ 🇰🇷 👩‍💻 🧑🏽‍🚀 ✅ ❌ 🚀 🐶 🍕",
    "Mixed: 서울 Seoul 東京 Tokyo 🚀 launch, 가격은 $9.99 입니다 😀",
)


def _training_corpus() -> list[str]:
    # Repetition gives frequent words enough counts to win merges over rare byte pairs.
    return [line for line in _CORPUS for _ in range(4)]


def build_tokenizer(*, model_max_length: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer in-process and wrap it as a transformers fast tokenizer.

    Byte-level BPE is used because its 256-byte base alphabet can encode *any* Unicode string
    (Korean, emoji, unseen scripts) without ``<unk>``, which is what matters for the service; the
    real Gemma SentencePiece model gets the same property from byte fallback.

    Returns a ``transformers.PreTrainedTokenizerFast`` with Gemma's special tokens that adds
    ``<bos>`` at the start and ``<eos>`` at the end, like EmbeddingGemma's tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # NFC so composed and decomposed Hangul produce the same ids.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"special token {token} did not get Gemma's id {token_id}")

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=True,
        padding_side="right",
        model_max_length=model_max_length,
    )


def _gemma_config(spec: _Spec) -> Gemma3TextConfig:
    from transformers import Gemma3TextConfig

    layer_types = [
        "sliding_attention" if (i + 1) % spec.sliding_window_pattern else "full_attention"
        for i in range(spec.num_hidden_layers)
    ]
    config = Gemma3TextConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        attention_bias=False,
        attention_dropout=0.0,
        # EmbeddingGemma scales attention by head_dim (256), not hidden/heads.
        query_pre_attn_scalar=spec.head_dim,
        # The config halves this internally when bidirectional (window on both sides) and writes the
        # original value back on save, so pass the value the real config.json carries.
        sliding_window=spec.sliding_window,
        layer_types=layer_types,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        # Without this, Gemma3 is a causal decoder; EmbeddingGemma attends to the whole input.
        use_bidirectional_attention=True,
        use_cache=False,
        architectures=["Gemma3TextModel"],
    )
    # Only a back-compat field once layer_types is given, but keep it truthful in config.json.
    config._sliding_window_pattern = spec.sliding_window_pattern
    return config


def _dense(in_features: int, out_features: int, std: float) -> nn.Module:
    from sentence_transformers.sentence_transformer.modules import Dense

    dense = Dense(in_features, out_features, bias=False, activation_function=nn.Identity())
    nn.init.normal_(dense.linear.weight, mean=0.0, std=std)
    return dense


def build_gemma_like_model(
    path: str | Path,
    *,
    size: GemmaSize = "tiny",
    seed: int = 0,
) -> Path:
    """Build a random-weight EmbeddingGemma-300m look-alike and save it as a SentenceTransformer.

    The saved directory loads offline with ``SentenceTransformer(str(path))`` and has the real
    model's module layout (Gemma3TextModel with bidirectional attention -> mean Pooling ->
    Dense(h->4h) -> Dense(4h->h) -> Normalize), prompts and similarity function.

    Args:
        path: Target directory (created; existing files with the same names are overwritten).
        size: ``"full"`` has the real sizes (~300M params, ~1.2 GB fp32; benchmarks only),
            ``"tiny"`` has the same structure with small sizes (a few MB, builds in ~1 s; tests),
            ``"minimal"`` one small layer (the stack ceiling's near-free encoder).
        seed: Seed for the weight init so that builds are reproducible.

    Returns:
        The target directory as a ``Path``.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import Gemma3TextModel

    if size not in _SPECS:
        raise ValueError(f"size must be one of {sorted(_SPECS)}, got {size!r}")
    spec = _SPECS[size]
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(model_max_length=spec.max_position_embeddings)
    if len(tokenizer) > spec.vocab_size:
        raise RuntimeError(
            f"tokenizer has {len(tokenizer)} tokens, model vocab is {spec.vocab_size}"
        )

    config = _gemma_config(spec)
    # fork_rng: seeding must not reset the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = Gemma3TextModel(config).float().eval()

    # Transformer() can only load from a directory, so stage the backbone next to the target
    # (not in /tmp, which may be RAM-backed and the full model is 1.2 GB).
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-stage-") as stage:
        backbone.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        del backbone
        gc.collect()

        transformer = Transformer(
            stage,
            max_seq_length=spec.max_position_embeddings,
            model_kwargs={"dtype": torch.float32},
        )
        # Separate, fixed stream for the heads so their init does not depend on backbone size.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            up = _dense(spec.hidden_size, spec.dense_size, config.initializer_range)
            down = _dense(spec.dense_size, spec.hidden_size, config.initializer_range)
        modules: list[nn.Module] = [
            transformer,
            Pooling(spec.hidden_size, pooling_mode="mean", include_prompt=True),
            up,
            down,
            Normalize(),
        ]
        model = SentenceTransformer(
            modules=modules,
            device="cpu",
            prompts=dict(EMBEDDING_GEMMA_PROMPTS),
            default_prompt_name=None,
            similarity_fn_name="cosine",
        )
        model.max_seq_length = spec.max_position_embeddings
        model.save(str(target))
        del model, modules, transformer, up, down
        gc.collect()

    return target


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``bench/gemma_builder.py PATH [--size minimal|tiny|full]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="output directory")
    parser.add_argument("--size", choices=sorted(_SPECS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--force", action="store_true", help="delete an existing directory at PATH first"
    )
    args = parser.parse_args(argv)
    if args.force and args.path.exists():
        shutil.rmtree(args.path)
    out = build_gemma_like_model(args.path, size=args.size, seed=args.seed)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
