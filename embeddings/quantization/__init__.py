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
asymmetrically (mean cosine ~0.998 on MiniLM; ~0.995 with fbgemm's 7-bit codes on AVX2) or not
at all (weight-only, ~0.999).

Whatever the mode, the returned model's ``encode`` output is float32.

Modules: :mod:`.cpu` (what this CPU computes natively), :mod:`.modes` (which mode a request
means), :mod:`.int8` (the int8 modules), :mod:`.checkpoint` (converting off the memory-mapped
checkpoint without holding it resident), :mod:`.loading` (:func:`load_quantized_model`). The
accuracy set and the memory readings used by benchmarks and tests live in ``bench/``.
"""

from embeddings.quantization.cpu import (
    cpu_supports_fbgemm_int8,
    cpu_supports_int8_matmul,
    cpu_supports_native_bf16,
)
from embeddings.quantization.int8 import (
    INT8_KERNELS,
    Int8Embedding,
    Int8Kernel,
    Int8Linear,
    quantize_model_int8,
)
from embeddings.quantization.loading import (
    QuantizationInfo,
    load_quantized_model,
    model_weight_bytes,
    trim_memory,
)
from embeddings.quantization.modes import (
    FP16_UNSAFE_MODEL_TYPES,
    VALID_QUANTIZATION_MODES,
    QuantizationMode,
    QuantizationPlan,
    resolve_quantization,
)

__all__ = [
    "FP16_UNSAFE_MODEL_TYPES",
    "INT8_KERNELS",
    "VALID_QUANTIZATION_MODES",
    "Int8Embedding",
    "Int8Kernel",
    "Int8Linear",
    "QuantizationInfo",
    "QuantizationMode",
    "QuantizationPlan",
    "cpu_supports_fbgemm_int8",
    "cpu_supports_int8_matmul",
    "cpu_supports_native_bf16",
    "load_quantized_model",
    "model_weight_bytes",
    "quantize_model_int8",
    "resolve_quantization",
    "trim_memory",
]
