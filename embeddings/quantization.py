"""CPU weight quantization for SentenceTransformer models (``MODEL_QUANTIZATION``).

Modes and why they exist:

``fp32``
    The reference. Weights stay in the memory-mapped safetensors file, so untouched pages (e.g.
    embedding rows of tokens never seen) are never read and the page cache is shared by workers.
``bf16``
    About 2-3x faster than fp32 on CPUs with native bf16 (AVX512-BF16 / AMX on x86, the ``bf16``
    feature on Arm), with embeddings within ~1e-4 cosine of fp32. Emulated elsewhere, hence slow.
``fp16``
    Supported for models that tolerate it. Gemma-family models (EmbeddingGemma) overflow in fp16
    activations and Google documents no fp16 support, so fp16 is mapped to bf16 with a warning.
``int8``
    Every ``nn.Linear`` (backbone and Dense heads) and every large ``nn.Embedding`` (vocabulary
    tables) holds int8 weights with one fp32 scale per output channel / per embedding row, roughly
    a quarter of the fp32 bytes. For EmbeddingGemma two thirds of the weights are the
    262144 x 768 token table, so the table is quantized too (only the gathered rows are
    dequantized, Gemma's sqrt(hidden) embedding scale is kept). The matmul kernel depends on the
    CPU, see :data:`Int8Kernel`.
``auto``
    ``bf16`` where the CPU has native bf16, otherwise ``int8`` (e.g. Arm Neoverse N1 / Graviton2).

Plain ``torch.ao`` dynamic int8 (per-tensor activation scale) was measured at mean cosine ~0.90
(per-tensor weights) and ~0.96 (per-channel weights) to fp32 on MiniLM, below the 0.99 the service
requires: one scale for a whole batch of tokens cannot follow tokens whose magnitudes differ by
orders of magnitude. The int8 recipe here instead quantizes activations per token and
asymmetrically (mean cosine ~0.998 on MiniLM) or not at all (weight-only, ~0.999).

Whatever the mode, the returned model's ``encode`` output is float32.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import platform
import threading
import time
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from transformers import PretrainedConfig

__all__ = [
    "FP16_UNSAFE_MODEL_TYPES",
    "INT8_KERNELS",
    "MULTILINGUAL_EVAL_SENTENCES",
    "VALID_QUANTIZATION_MODES",
    "Int8Embedding",
    "Int8Kernel",
    "Int8Linear",
    "QuantizationInfo",
    "QuantizationMode",
    "QuantizationPlan",
    "check_accuracy",
    "cpu_supports_int8_matmul",
    "cpu_supports_native_bf16",
    "load_quantized_model",
    "mean_cosine",
    "min_cosine",
    "model_weight_bytes",
    "quantize_model_int8",
    "resident_memory_mb",
    "resolve_quantization",
    "trim_memory",
]

logger = logging.getLogger(__name__)

QuantizationMode = Literal["int8", "bf16", "fp16", "fp32"]
VALID_QUANTIZATION_MODES: Final[tuple[str, ...]] = ("auto", "int8", "bf16", "fp16", "fp32")

Int8Kernel = Literal["dynamic_int8", "dequantize", "weight_only_pack"]
"""How :class:`Int8Linear` multiplies.

``dynamic_int8``
    Activations quantized per token (asymmetric uint8 range mapped onto int8) and multiplied with
    ``torch._int_mm`` (int8 x int8 -> int32). Fast (oneDNN VNNI/AMX) only on x86 with AVX512-VNNI;
    PyTorch runs it as a naive scalar loop everywhere else (~50x slower than fp32).
``dequantize``
    Dequantizes one layer's weight to fp32 just before its fp32 matmul. Runs at roughly fp32 speed
    on every CPU (it uses the normal BLAS), keeps only int8 weights resident, and is the most
    accurate (weight-only). The fallback wherever ``dynamic_int8`` is slow, e.g. Arm.
``weight_only_pack``
    ``torch._weight_int8pack_mm`` with fp32 activations. Has a NEON kernel on aarch64 that may beat
    ``dequantize`` at batch size 1 there; on x86 its fp32 path is scalar (~13x slower than fp32
    here), so it is never picked automatically. Offered for benchmarking on Arm.
"""
INT8_KERNELS: Final[tuple[str, ...]] = ("dynamic_int8", "dequantize", "weight_only_pack")

# Gemma models produce activations beyond the fp16 range (EmbeddingGemma's model card: "activations
# do not support float16"); everything else is allowed to try fp16.
FP16_UNSAFE_MODEL_TYPES: Final[frozenset[str]] = frozenset(
    {"gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "t5gemma"}
)

_MIN_COSINE: Final = 0.99

# Fixed accuracy set for comparing a quantized model to fp32 (report and tests): varied lengths,
# English and Korean (the service's main languages), a few mixed-script, other-script, emoji and
# code inputs, since those exercise rare embedding rows and unusual activations.
MULTILINGUAL_EVAL_SENTENCES: Final[tuple[str, ...]] = (
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password if I no longer have access to my email account?",
    "Quantization reduces memory usage and speeds up inference on commodity CPUs, but it can "
    "hurt accuracy if it is done carelessly.",
    "Apple unveiled its new phone at an event in Cupertino on Tuesday.",
    "Python is a programming language that lets you work quickly and integrate systems more "
    "effectively.",
    "I'm looking for a vegetarian restaurant near the train station that is open late.",
    "The mitochondria is the powerhouse of the cell.",
    "Stock markets fell sharply after the central bank raised interest rates by half a point.",
    "A man is playing a guitar on stage.",
    "Hello!",
    "What is the capital of South Korea?",
    "Seoul is the capital and largest city of South Korea, with nearly ten million people living "
    "in the city proper and about half of the country's population in the wider metropolitan "
    "area. It has been the capital of Korean states for more than six hundred years.",
    "Refunds are processed within five business days after the returned item arrives at our "
    "warehouse.",
    "안녕하세요, 만나서 반갑습니다.",
    "오늘 서울의 날씨는 맑고 최고 기온은 24도입니다.",
    "비밀번호를 잊어버렸는데 어떻게 재설정할 수 있나요?",
    "대한민국의 수도는 서울이며 가장 큰 도시입니다.",
    "한국어 자연어 처리는 형태소 분석과 띄어쓰기 문제 때문에 어렵습니다.",
    "양자화는 메모리 사용량을 줄이고 CPU에서 추론 속도를 높이지만, 부주의하게 적용하면 정확도가 "
    "떨어질 수 있습니다.",
    "회의는 내일 오후 세 시에 본사 회의실에서 열립니다.",
    "김치찌개와 된장찌개 중에서 무엇을 드시겠어요?",
    "이 서비스는 모든 입력 텍스트에 대해 정규화된 벡터를 반환합니다.",
    "주식 시장은 중앙은행의 금리 인상 발표 이후 급격히 하락했습니다.",
    "고양이가 소파 위에서 낮잠을 자고 있다.",
    "네",
    "환불은 반품된 상품이 물류 창고에 도착한 후 영업일 기준 5일 이내에 처리되며, 카드 결제의 "
    "경우 카드사 사정에 따라 추가로 며칠이 더 걸릴 수 있습니다.",
    "서울 Seoul에서 열리는 AI 컨퍼런스 2025에 참가 신청하세요!",
    "이번 release에서는 bug fix와 performance 개선이 포함되었습니다.",
    "今日はいい天気ですね。",
    "我们使用向量来表示句子的含义。",
    "El rápido zorro marrón salta sobre el perro perezoso.",
    "Le service renvoie des vecteurs normalisés pour chaque texte.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "Der Zug nach Berlin hat heute zwanzig Minuten Verspätung.",
    "🚀 Launch day! 🎉🔥",
    "def add(a: int, b: int) -> int:\n    return a + b",
)


# --------------------------------------------------------------------------------------------
# CPU capabilities
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    # x86 lists ISA extensions under "flags", Arm under "Features".
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip().lower() in {"flags", "features"}:
                    flags.update(value.split())
    except OSError:
        pass
    return frozenset(flags)


def cpu_supports_native_bf16() -> bool:
    """Whether bf16 math runs natively, which is what makes ``bf16`` faster than fp32.

    x86: AVX512-BF16 or AMX-BF16. aarch64: the ``bf16`` feature (e.g. Graviton3, not Graviton2 /
    Neoverse N1). Without it PyTorch emulates bf16 and is slower than fp32.
    """
    flags = _cpu_flags()
    machine = platform.machine().lower()
    if machine in {"x86_64", "amd64", "i686", "i386"}:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    if machine in {"aarch64", "arm64"}:
        return "bf16" in flags
    return False


def cpu_supports_int8_matmul() -> bool:
    """Whether ``torch._int_mm`` has a fast CPU kernel here.

    PyTorch only routes it to oneDNN on x86 with AVX512-VNNI; everywhere else it runs a naive
    triple loop, so dynamic int8 matmuls would be far slower than fp32.
    """
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return False
    flags = _cpu_flags()
    return bool(flags & {"avx512_vnni", "amx_int8"}) and torch.backends.mkldnn.is_available()


def _default_int8_kernel() -> Int8Kernel:
    return "dynamic_int8" if cpu_supports_int8_matmul() else "dequantize"


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizationPlan:
    """What will be applied for a requested ``MODEL_QUANTIZATION`` value, and why.

    Attributes:
        requested: The value as configured (normalised to lower case).
        mode: The precision actually applied.
        reason: One line for the startup log explaining the choice.
        warnings: Messages the caller should log at WARNING level.
    """

    requested: str
    mode: QuantizationMode
    reason: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantizationInfo:
    """What :func:`load_quantized_model` did, for logs, metrics and the API's model info.

    Attributes:
        requested: The configured value.
        mode: The precision label to report ("int8", "bf16", "fp16" or "fp32").
        warnings: Messages the caller should log at WARNING level (not logged here).
        reason: Why this mode was chosen.
        int8_kernel: For ``int8``, the matmul kernel used (see :data:`Int8Kernel`).
        native_bf16: Whether the CPU has native bf16 (drives ``auto``).
        load_seconds: Wall time of loading plus quantizing.
        weight_bytes: Bytes of all parameters and buffers after quantization.
    """

    requested: str
    mode: QuantizationMode
    warnings: tuple[str, ...] = ()
    reason: str = ""
    int8_kernel: Int8Kernel | None = None
    native_bf16: bool = False
    load_seconds: float = 0.0
    weight_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> str:
        """Alias of :attr:`mode` for callers that report a dtype."""
        return self.mode


def _normalise_mode(requested: str) -> str:
    if not isinstance(requested, str):
        raise ValueError(
            f"MODEL_QUANTIZATION must be a string, one of {', '.join(VALID_QUANTIZATION_MODES)}; "
            f"got {requested!r}"
        )
    value = requested.strip().lower()
    aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}
    value = aliases.get(value, value)
    if value not in VALID_QUANTIZATION_MODES:
        raise ValueError(
            f"Unknown MODEL_QUANTIZATION {requested!r}; valid values are: "
            f"{', '.join(VALID_QUANTIZATION_MODES)}"
        )
    return value


def _model_types(model: SentenceTransformer | PretrainedConfig) -> set[str]:
    if not isinstance(model, nn.Module):
        model_type = getattr(model, "model_type", None)
        return {model_type} if isinstance(model_type, str) else set()
    types: set[str] = set()
    for module in model.children():
        config = getattr(getattr(module, "auto_model", None), "config", None)
        if config is not None and isinstance(getattr(config, "model_type", None), str):
            types.add(config.model_type)
    return types


def resolve_quantization(
    requested: str,
    *,
    model: SentenceTransformer | PretrainedConfig,
    native_bf16: bool | None = None,
) -> QuantizationPlan:
    """Decide which precision to apply for ``requested`` on this CPU and this model.

    ``auto`` picks bf16 only where the CPU computes bf16 natively (otherwise bf16 is emulated and
    slower than fp32) and int8 elsewhere. ``fp16`` on a Gemma-family model is mapped to bf16 with a
    warning rather than refused, because Gemma activations overflow fp16 and bf16 has the same
    memory footprint with fp32's range; refusing would turn a config slip into an outage.

    Args:
        requested: ``auto``, ``int8``, ``bf16``, ``fp16`` or ``fp32`` (case-insensitive).
        model: The loaded model, or its transformers config, to detect the architecture.
        native_bf16: Override CPU detection (tests, and to plan for another machine).

    Raises:
        ValueError: ``requested`` is not a valid mode; the message lists the valid ones.
    """
    value = _normalise_mode(requested)
    has_bf16 = cpu_supports_native_bf16() if native_bf16 is None else native_bf16
    warnings: list[str] = []

    if value == "auto":
        if has_bf16:
            return QuantizationPlan(value, "bf16", "auto: the CPU has native bf16")
        return QuantizationPlan(value, "int8", "auto: the CPU has no native bf16, using int8")

    if value == "fp16":
        unsafe = sorted(_model_types(model) & FP16_UNSAFE_MODEL_TYPES)
        if unsafe:
            warnings.append(
                f"MODEL_QUANTIZATION=fp16 is not supported for {', '.join(unsafe)} models "
                "(activations overflow float16); using bf16 instead."
            )
            value = "bf16"
        else:
            return QuantizationPlan("fp16", "fp16", "fp16 requested")

    if value == "bf16" and not has_bf16:
        warnings.append(
            "bf16 requested but this CPU has no native bf16 (AVX512-BF16/AMX or Arm BF16); it will "
            "be emulated and is likely slower than fp32. Consider MODEL_QUANTIZATION=int8."
        )
    mode: QuantizationMode = value  # type: ignore[assignment]
    reason = f"{requested.strip().lower()} requested" + (" (mapped)" if warnings else "")
    return QuantizationPlan(requested.strip().lower(), mode, reason, tuple(warnings))


# --------------------------------------------------------------------------------------------
# int8 modules
# --------------------------------------------------------------------------------------------

_ROW_CHUNK = 8192

# Small tables (BERT's 2-row token-type and 512-row position tables) are added to *every* token,
# so their rounding error is a bias on the whole sequence: quantizing MiniLM's token-type table
# alone cost 0.0006 mean cosine, more than its 30522-row vocabulary table (0.00002). They are a
# few hundred KB, so they stay fp32.
_MIN_QUANTIZED_EMBEDDING_ROWS = 1024


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row, in chunks so a 262144 x 768 fp32 table never gets a full-size
    temporary (the weight may still be a lazily paged mmap)."""
    rows, cols = weight.shape
    quantized = torch.empty((rows, cols), dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, rows, _ROW_CHUNK):
            block = weight[start : start + _ROW_CHUNK].to(torch.float32)
            scale = block.abs().amax(dim=1) / 127.0
            # All-zero rows (padding embeddings) would divide by zero.
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            quantized[start : start + _ROW_CHUNK] = (
                torch.round(block / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            )
            scales[start : start + _ROW_CHUNK] = scale
    return quantized, scales


_SCRATCH = threading.local()


class Int8Linear(nn.Module):
    """Drop-in ``nn.Linear`` with int8 per-output-channel weights; fp32 in, fp32 out.

    Stores only int8 weights (+ one fp32 scale per output channel and the fp32 bias), so a
    quantized model never holds fp32 weight copies. See :data:`Int8Kernel` for the kernels.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        kernel: Int8Kernel,
    ) -> None:
        super().__init__()
        if kernel not in INT8_KERNELS:
            raise ValueError(f"int8 kernel must be one of {INT8_KERNELS}, got {kernel!r}")
        self.out_features, self.in_features = weight.shape
        self.kernel: Int8Kernel = kernel
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.to(torch.float32).contiguous())
        # The asymmetric activation offset contributes offset * sum_k(W[n, k]); precomputing the
        # per-channel sums keeps that to one rank-1 update per call.
        self.register_buffer(
            "weight_sum",
            weight.sum(dim=1, dtype=torch.int64).to(torch.float32).mul_(self.weight_scale)
            if kernel == "dynamic_int8"
            else None,
        )
        self.register_buffer(
            "bias", None if bias is None else bias.detach().to(torch.float32).clone()
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, kernel: Int8Kernel) -> Int8Linear:
        """Quantize ``linear`` (symmetric int8 per output channel)."""
        weight, scale = _quantize_rows(linear.weight.detach())
        return cls(weight, scale, linear.bias, kernel=kernel)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, kernel={self.kernel}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, self.in_features)
        if x2d.dtype != torch.float32:
            x2d = x2d.to(torch.float32)
        if self.kernel == "dynamic_int8":
            y = self._dynamic_int8(x2d)
        elif self.kernel == "weight_only_pack":
            y = torch._weight_int8pack_mm(x2d.contiguous(), self.weight, self.weight_scale)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = functional.linear(x2d, self._dequantized_weight(x2d), self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def _dequantized_weight(self, x: torch.Tensor) -> torch.Tensor:
        # One reused fp32 scratch per thread, shared by all layers: a fresh multi-MB tensor per
        # call costs page faults that made this path 2x slower than the matmul itself, while a
        # per-layer cache would bring back the fp32 weights quantization is meant to drop.
        if torch.is_grad_enabled() and x.requires_grad:
            # autograd keeps the weight for backward; a shared scratch would be overwritten.
            return self.weight.to(torch.float32).mul_(self.weight_scale[:, None])
        # Tensors made under inference_mode cannot be written outside it (and vice versa is
        # allowed but would make later inference-mode writes fail), so keep one per mode.
        slot = "inference" if torch.is_inference_mode_enabled() else "normal"
        numel = self.weight.numel()
        scratch: torch.Tensor | None = getattr(_SCRATCH, slot, None)
        if scratch is None or scratch.numel() < numel:
            scratch = torch.empty(numel, dtype=torch.float32)
            setattr(_SCRATCH, slot, scratch)
        weight = scratch[:numel].view(self.out_features, self.in_features)
        # copy_ converts int8 with a vectorised kernel; torch.mul(int8, fp32, out=) takes a
        # type-promotion path measured ~50x slower.
        return weight.copy_(self.weight).mul_(self.weight_scale[:, None])

    def _dynamic_int8(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_empty((0, self.out_features))
        # Per-token asymmetric range: post-GELU inputs are mostly positive, so a symmetric range
        # would waste half the int8 codes (measured: MiniLM mean cosine 0.9959 -> 0.9984).
        # Separate amin/amax: torch.aminmax measured ~15x slower on CPU for these shapes.
        low = x.amin(dim=1, keepdim=True).clamp_(max=0.0)
        high = x.amax(dim=1, keepdim=True).clamp_(min=0.0)
        step = (high - low).clamp_(min=1e-12).div_(255.0)
        # x ~= step * q + offset with q in [-128, 127].
        offset = low.add_(step, alpha=128.0)
        quantized = (x - offset).div_(step).round_().clamp_(-128.0, 127.0).to(torch.int8)
        accumulated = torch._int_mm(quantized, self.weight.t())
        # Convert first: int32 * fp32 via type promotion was ~30x slower than to() + mul_.
        y = accumulated.to(torch.float32).mul_(step).mul_(self.weight_scale)
        y.addr_(offset.squeeze(1), self.weight_sum)
        if self.bias is not None:
            y.add_(self.bias)
        return y


class Int8Embedding(nn.Module):
    """Drop-in ``nn.Embedding`` with int8 rows and one fp32 scale per row.

    Only the gathered rows are dequantized, so the lookup costs no more than the fp32 one.
    ``output_scale`` carries Gemma3's ``embed_scale`` (sqrt(hidden_size)) that
    ``Gemma3TextScaledWordEmbedding`` multiplies into every lookup.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        row_scale: torch.Tensor,
        *,
        padding_idx: int | None = None,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.output_scale = float(output_scale)
        self.register_buffer("weight", weight.contiguous())
        # Folding the output scale into the row scales saves one multiply per lookup.
        self.register_buffer("row_scale", (row_scale.to(torch.float32) * self.output_scale))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        """Quantize ``embedding``; keeps Gemma's ``embed_scale`` if present."""
        scale_buffer = getattr(embedding, "embed_scale", None)
        output_scale = 1.0
        if scale_buffer is not None:
            output_scale = float(getattr(embedding, "scalar_embed_scale", scale_buffer))
        weight, row_scale = _quantize_rows(embedding.weight.detach())
        return cls(weight, row_scale, padding_idx=embedding.padding_idx, output_scale=output_scale)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
            f"output_scale={self.output_scale:g}"
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = functional.embedding(input_ids, self.weight).to(torch.float32)
        return rows.mul_(functional.embedding(input_ids, self.row_scale[:, None]))


def _replace_children(root: nn.Module, kernel: Int8Kernel) -> int:
    replaced = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            new: nn.Module | None = None
            if type(child) is nn.Linear:
                new = Int8Linear.from_linear(child, kernel=kernel)
            elif (
                isinstance(child, nn.Embedding)
                and child.weight.dim() == 2
                and child.num_embeddings >= _MIN_QUANTIZED_EMBEDDING_ROWS
                and child.max_norm is None  # renormalising lookups would rewrite int8 rows
            ):
                new = Int8Embedding.from_embedding(child)
            if new is not None:
                setattr(parent, name, new)
                replaced += 1
                del child
    return replaced


def quantize_model_int8(model: nn.Module, *, kernel: Int8Kernel | None = None) -> int:
    """Replace every ``nn.Linear`` and large ``nn.Embedding`` in ``model`` by int8 ones, in place.

    Layers are replaced one at a time so peak memory stays near one layer above the quantized
    size. Remaining float tensors (norms, biases) are copied off the checkpoint's mmap so the
    fp32 file mapping can be released. Returns how many modules were replaced.
    """
    chosen: Int8Kernel = kernel or _default_int8_kernel()
    with torch.no_grad():
        replaced = _replace_children(model, chosen)
        _detach_from_checkpoint(model)
    return replaced


def _detach_from_checkpoint(model: nn.Module, *, dtype: torch.dtype | None = None) -> None:
    """Give every parameter and buffer its own storage, optionally casting float parameters.

    Tensors loaded from safetensors are views into one mmap of the whole file, and a single
    surviving view keeps the entire fp32 file mapped (that is how an "int8" model ended up 16 MB
    larger than fp32, and bf16 larger than fp32). Only parameters are cast: buffers such as rotary
    ``inv_freq`` stay fp32, as when transformers loads with ``dtype=bf16``; Gemma's
    ``embed_scale`` buffer is cast to the weight dtype at use anyway.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (Int8Linear, Int8Embedding)):
                continue  # built from fresh tensors already
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                target = dtype if (dtype is not None and param.is_floating_point()) else None
                module._parameters[name] = nn.Parameter(
                    param.detach().to(dtype=target or param.dtype, copy=True),
                    requires_grad=False,
                )
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = buffer.detach().clone()


# --------------------------------------------------------------------------------------------
# Memory helpers
# --------------------------------------------------------------------------------------------


def resident_memory_mb() -> float:
    """Current resident set size of this process in MiB (``VmRSS`` from /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def trim_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS.

    glibc keeps freed small allocations in its arenas, so RSS would keep counting the fp32 tensors
    a quantization pass just released; ``malloc_trim`` returns them.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, counting shared storages once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


# --------------------------------------------------------------------------------------------
# Accuracy helpers
# --------------------------------------------------------------------------------------------


def _row_cosines(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    left = np.asarray(a, dtype=np.float64)
    right = np.asarray(b, dtype=np.float64)
    if left.shape != right.shape:
        raise ValueError(f"shape mismatch: {left.shape} vs {right.shape}")
    left = left.reshape(left.shape[0], -1) if left.ndim > 1 else left[None, :]
    right = right.reshape(right.shape[0], -1) if right.ndim > 1 else right[None, :]
    norms = np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1)
    return np.einsum("ij,ij->i", left, right) / np.maximum(norms, 1e-30)


def mean_cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Mean row-wise cosine similarity between two embedding matrices of the same shape."""
    return float(_row_cosines(a, b).mean())


def min_cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Worst row-wise cosine similarity between two embedding matrices of the same shape."""
    return float(_row_cosines(a, b).min())


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value if value.dtype == torch.float32 else value.to(torch.float32)
    return value


def _cast_features_hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
    # Casting the Transformer module's features makes everything after it (pooling, Dense heads,
    # Normalize) run in fp32, which keeps outputs float32 and unit norm exact. The features are a
    # BatchEncoding, a UserDict rather than a dict.
    if isinstance(output, MutableMapping):
        for key in ("token_embeddings", "sentence_embedding", "all_layer_embeddings"):
            if key in output:
                value = output[key]
                if isinstance(value, (list, tuple)):
                    output[key] = type(value)(_to_float32(item) for item in value)
                else:
                    output[key] = _to_float32(value)
    return output


def _backbones(model: SentenceTransformer) -> list[nn.Module]:
    return [
        module
        for module in model.children()
        if isinstance(getattr(module, "auto_model", None), nn.Module)
    ]


def _apply_half_precision(model: SentenceTransformer, dtype: torch.dtype) -> None:
    for module in _backbones(model):
        _detach_from_checkpoint(module.auto_model, dtype=dtype)
        module.register_forward_hook(_cast_features_hook)
    # Heads stay fp32: a few MB, and their inputs arrive as fp32 from the hook above.
    for module in model.children():
        if module not in _backbones(model):
            _detach_from_checkpoint(module, dtype=torch.float32)


def _apply_int8(model: SentenceTransformer, kernel: Int8Kernel) -> int:
    replaced = quantize_model_int8(model, kernel=kernel)
    for module in _backbones(model):
        module.register_forward_hook(_cast_features_hook)
    return replaced


def load_quantized_model(
    model_name_or_path: str,
    *,
    quantization: str,
    token: str | None,
    max_seq_length: int | None,
    cache_folder: str | None = None,
    int8_kernel: Int8Kernel | None = None,
    native_bf16: bool | None = None,
) -> tuple[SentenceTransformer, QuantizationInfo]:
    """Load a SentenceTransformer on CPU and apply ``MODEL_QUANTIZATION``.

    The checkpoint is opened in fp32: transformers memory-maps safetensors, so this reads nothing
    yet. The chosen precision is then applied module by module and every tensor gets its own
    storage, after which the fp32 mapping is released and freed heap is trimmed, so no fp32 copy
    stays resident (bf16 ends at half and int8 at about a quarter of the fp32 bytes). fp32 keeps
    the lazily paged mmap, which workers share through the page cache.

    Args:
        model_name_or_path: Hub id (``org/name``) or local directory.
        quantization: ``auto``, ``int8``, ``bf16``, ``fp16`` or ``fp32``; see
            :func:`resolve_quantization`.
        token: Hugging Face token for gated/private hub models (None for public or local).
        max_seq_length: Override the model's maximum sequence length (None keeps the model's).
        cache_folder: Hub cache directory (None uses the default).
        int8_kernel: Force an int8 kernel (benchmarks); None picks the fast one for this CPU.
        native_bf16: Override bf16 detection for ``auto`` (tests).

    Returns:
        The model (``encode`` returns float32 in every mode) and a :class:`QuantizationInfo`.

    Raises:
        ValueError: Unknown ``quantization`` or ``int8_kernel`` (raised before loading anything).
    """
    from sentence_transformers import SentenceTransformer

    _normalise_mode(quantization)
    if int8_kernel is not None and int8_kernel not in INT8_KERNELS:
        raise ValueError(f"int8_kernel must be one of {INT8_KERNELS}, got {int8_kernel!r}")

    started = time.perf_counter()
    model = SentenceTransformer(
        str(model_name_or_path) if isinstance(model_name_or_path, Path) else model_name_or_path,
        device="cpu",
        token=token,
        cache_folder=cache_folder,
        model_kwargs={"dtype": torch.float32},
    )
    model.eval()
    # Warnings are returned, not logged here, so the caller logs them once in its own format.
    plan = resolve_quantization(quantization, model=model, native_bf16=native_bf16)

    kernel: Int8Kernel | None = None
    extra: dict[str, Any] = {}
    if plan.mode == "int8":
        kernel = int8_kernel or _default_int8_kernel()
        extra["int8_modules"] = _apply_int8(model, kernel)
    elif plan.mode in {"bf16", "fp16"}:
        _apply_half_precision(model, torch.bfloat16 if plan.mode == "bf16" else torch.float16)
    if plan.mode != "fp32":
        trim_memory()

    if max_seq_length is not None:
        model.max_seq_length = max_seq_length

    info = QuantizationInfo(
        requested=plan.requested,
        mode=plan.mode,
        warnings=plan.warnings,
        reason=plan.reason,
        int8_kernel=kernel,
        native_bf16=cpu_supports_native_bf16() if native_bf16 is None else native_bf16,
        load_seconds=time.perf_counter() - started,
        weight_bytes=model_weight_bytes(model),
        extra=extra,
    )
    logger.info(
        "Loaded %s with quantization=%s (%s)%s in %.1fs, weights %.0f MB",
        model_name_or_path,
        info.mode,
        plan.reason,
        f", int8 kernel {kernel}" if kernel else "",
        info.load_seconds,
        info.weight_bytes / 2**20,
    )
    return model, info


def check_accuracy(
    model: SentenceTransformer,
    reference: np.ndarray,
    *,
    sentences: Iterable[str] = MULTILINGUAL_EVAL_SENTENCES,
    threshold: float = _MIN_COSINE,
) -> tuple[float, float]:
    """Encode ``sentences`` and return (mean, min) cosine to ``reference`` embeddings.

    Raises ``AssertionError`` if the mean is below ``threshold`` (0.99 by default).
    """
    embeddings = model.encode(list(sentences), batch_size=8, convert_to_numpy=True)
    mean, worst = mean_cosine(embeddings, reference), min_cosine(embeddings, reference)
    if not mean >= threshold:
        raise AssertionError(f"mean cosine {mean:.5f} to fp32 is below {threshold}")
    return mean, worst
