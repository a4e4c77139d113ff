"""Which precision a ``MODEL_QUANTIZATION`` value means on this CPU for this model, and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, cast

from torch import nn

from embeddings.quantization.cpu import cpu_supports_native_bf16

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from transformers import PretrainedConfig

__all__ = [
    "FP16_UNSAFE_MODEL_TYPES",
    "VALID_QUANTIZATION_MODES",
    "QuantizationMode",
    "QuantizationPlan",
    "normalise_mode",
    "resolve_quantization",
]

QuantizationMode = Literal["int8", "bf16", "fp16", "fp32"]
VALID_QUANTIZATION_MODES: Final[tuple[str, ...]] = ("auto", "int8", "bf16", "fp16", "fp32")

# Gemma models produce activations beyond the fp16 range (EmbeddingGemma's model card: "activations
# do not support float16"); everything else is allowed to try fp16.
FP16_UNSAFE_MODEL_TYPES: Final[frozenset[str]] = frozenset(
    {"gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "t5gemma"}
)


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


def normalise_mode(requested: str) -> str:
    """``requested`` in lower case with aliases resolved; ValueError listing the valid values."""
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
    value = normalise_mode(requested)
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
    # Only int8, bf16 and fp32 reach this point; normalise_mode has rejected everything else.
    mode = cast(QuantizationMode, value)
    reason = f"{requested.strip().lower()} requested" + (" (mapped)" if warnings else "")
    return QuantizationPlan(requested.strip().lower(), mode, reason, tuple(warnings))
