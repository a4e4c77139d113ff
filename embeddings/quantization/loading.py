"""``load_quantized_model``: load a SentenceTransformer on CPU in the configured precision."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from embeddings.quantization.bf16 import bf16_packing_available, pack_bf16_linears
from embeddings.quantization.checkpoint import (
    CheckpointPages,
    detach_from_checkpoint,
    release_freed_heap,
)
from embeddings.quantization.cpu import cpu_supports_native_bf16
from embeddings.quantization.int8 import (
    INT8_KERNELS,
    Int8Kernel,
    default_int8_kernel,
    quantize_model_int8,
)
from embeddings.quantization.modes import QuantizationMode, normalise_mode, resolve_quantization

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["QuantizationInfo", "load_quantized_model", "model_weight_bytes", "trim_memory"]

logger = logging.getLogger(__name__)


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


def trim_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS.

    glibc keeps freed small allocations in its arenas, so RSS would keep counting the fp32 tensors
    a quantization pass just released; ``malloc_trim`` returns them.
    """
    gc.collect()
    release_freed_heap()


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, counting shared storages once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_mkldnn:  # oneDNN's packed bf16 weights: no storage; counted below
            continue
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    # Weights kept outside tensors (fbgemm's packed int8 layers, oneDNN's packed bf16 ones).
    return total + sum(int(getattr(module, "packed_bytes", 0)) for module in model.modules())


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


def _apply_half_precision(
    model: SentenceTransformer, dtype: torch.dtype, pages: CheckpointPages, *, pack: bool
) -> int:
    """Converts the backbones to `dtype`; how many of their linears were packed (bf16)."""
    backbones = _backbones(model)
    packed = 0
    pack = pack and dtype == torch.bfloat16 and bf16_packing_available()
    for module in backbones:
        backbone = module.auto_model
        assert isinstance(backbone, nn.Module)  # _backbones picked modules whose auto_model is one
        detach_from_checkpoint(backbone, pages=pages, dtype=dtype)
        if pack:
            with torch.no_grad():
                packed += pack_bf16_linears(backbone)
        module.register_forward_hook(_cast_features_hook)
    # Heads stay fp32: a few MB, and their inputs arrive as fp32 from the hook above.
    for module in model.children():
        if module not in backbones:
            detach_from_checkpoint(module, pages=pages, dtype=torch.float32)
    return packed


def _apply_int8(model: SentenceTransformer, kernel: Int8Kernel, pages: CheckpointPages) -> int:
    replaced = quantize_model_int8(model, kernel=kernel, pages=pages)
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
    pack_bf16: bool = True,
    native_bf16: bool | None = None,
) -> tuple[SentenceTransformer, QuantizationInfo]:
    """Load a SentenceTransformer on CPU and apply ``MODEL_QUANTIZATION``.

    The checkpoint is opened in fp32: transformers memory-maps safetensors, so this reads nothing
    yet. The chosen precision is then applied tensor by tensor, in chunks of rows, and each chunk
    of the mapped checkpoint is dropped from memory once converted (see
    :mod:`embeddings.quantization.checkpoint`), so loading peaks near the converted size instead
    of holding the whole fp32 file as well. Every tensor gets its own storage, after which the
    fp32 mapping is closed and freed heap is trimmed, so no fp32 copy stays resident (bf16 ends
    at half and int8 at about a quarter of the fp32 bytes). fp32 keeps the lazily paged mmap,
    which workers share through the page cache.

    Args:
        model_name_or_path: Hub id (``org/name``) or local directory.
        quantization: ``auto``, ``int8``, ``bf16``, ``fp16`` or ``fp32``; see
            :func:`resolve_quantization`.
        token: Hugging Face token for gated/private hub models (None for public or local).
        max_seq_length: Override the model's maximum sequence length (None keeps the model's).
        cache_folder: Hub cache directory (None uses the default).
        int8_kernel: Force an int8 kernel (benchmarks); None picks the fast one for this CPU.
        pack_bf16: False keeps bf16 linears plain (benchmarks); packing happens only where the
            CPU has native bf16 anyway (see :mod:`embeddings.quantization.bf16`).
        native_bf16: Override bf16 detection for ``auto`` (tests).

    Returns:
        The model (``encode`` returns float32 in every mode) and a :class:`QuantizationInfo`.

    Raises:
        ValueError: Unknown ``quantization`` or ``int8_kernel`` (raised before loading anything).
    """
    from sentence_transformers import SentenceTransformer

    normalise_mode(quantization)
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
    if plan.mode != "fp32":
        pages = CheckpointPages.of_this_process()
        if plan.mode == "int8":
            kernel = int8_kernel or default_int8_kernel()
            extra["int8_modules"] = _apply_int8(model, kernel, pages)
        else:
            half = torch.bfloat16 if plan.mode == "bf16" else torch.float16
            extra["packed_linears"] = _apply_half_precision(model, half, pages, pack=pack_bf16)
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
        "Loaded %s with quantization=%s (%s)%s%s in %.1fs, weights %.0f MB",
        model_name_or_path,
        info.mode,
        plan.reason,
        f", int8 kernel {kernel}" if kernel else "",
        f", {extra['packed_linears']} linears packed" if extra.get("packed_linears") else "",
        info.load_seconds,
        info.weight_bytes / 2**20,
    )
    return model, info
