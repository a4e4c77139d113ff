"""The int8 recipe: per-channel int8 weights for ``nn.Linear``, per-row for large ``nn.Embedding``.

Calibration-free. See :data:`Int8Kernel` for how the matmuls run on each CPU.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Final, Literal

import torch
from torch import nn
from torch.nn import functional

from embeddings.quantization.checkpoint import (
    CheckpointPages,
    detach_from_checkpoint,
    release_freed_heap,
    row_chunks,
)
from embeddings.quantization.cpu import cpu_supports_fbgemm_int8, cpu_supports_int8_matmul

__all__ = [
    "INT8_KERNELS",
    "Int8Embedding",
    "Int8Kernel",
    "Int8Linear",
    "default_int8_kernel",
    "quantize_model_int8",
]

Int8Kernel = Literal["dynamic_int8", "fbgemm", "dequantize", "weight_only_pack"]
"""How :class:`Int8Linear` multiplies.

``dynamic_int8``
    Activations quantized per token (asymmetric uint8 range mapped onto int8) and multiplied with
    ``torch._int_mm`` (int8 x int8 -> int32). Fast (oneDNN VNNI/AMX) only on x86 with AVX512-VNNI;
    PyTorch runs it as a naive scalar loop everywhere else (~50x slower than fp32).
``fbgemm``
    x86 with AVX2 but no VNNI. Activations quantized per token to 7 bits (0..127, asymmetric)
    and multiplied by fbgemm's u8 x s8 GEMM (``quantized::linear_dynamic``), which keeps the
    weights in its own packed int8 layout. fbgemm quantizes its input with one range per
    tensor; handed the codes themselves (integers 0..127) it maps them onto themselves, so each
    token keeps its own range (a text's vector does not depend on its batch-mates) and the
    products are exact integer sums. 7 bits because AVX2's 8-bit multiply-add saturates 16-bit
    pair sums at full range (fbgemm's ``reduce_range``). Measured here against ``dequantize``:
    1.5x faster per pass on the full-size EmbeddingGemma architecture at batch 1 (1.4x at 8),
    1.2-1.3x on MiniLM, and faster than fp32; mean cosine to fp32 0.995 on MiniLM (0.9992 for
    ``dequantize``).
``dequantize``
    Dequantizes one layer's weight to fp32 just before its fp32 matmul. Runs at roughly fp32 speed
    on every CPU (it uses the normal BLAS), keeps only int8 weights resident, and is the most
    accurate (weight-only). The fallback wherever ``dynamic_int8`` is slow, e.g. Arm.
``weight_only_pack``
    ``torch._weight_int8pack_mm`` with fp32 activations. Has a NEON kernel on aarch64 that may beat
    ``dequantize`` at batch size 1 there; on x86 its fp32 path is scalar (~13x slower than fp32
    here), so it is never picked automatically. Offered for benchmarking on Arm.
"""
INT8_KERNELS: Final[tuple[str, ...]] = ("dynamic_int8", "fbgemm", "dequantize", "weight_only_pack")


def default_int8_kernel() -> Int8Kernel:
    """``dynamic_int8`` where ``torch._int_mm`` is fast on this CPU (VNNI), ``fbgemm`` on other
    x86 CPUs with AVX2, else ``dequantize`` (Arm)."""
    if cpu_supports_int8_matmul():
        return "dynamic_int8"
    return "fbgemm" if cpu_supports_fbgemm_int8() else "dequantize"


def _fbgemm_pack(weight: torch.Tensor, scale: torch.Tensor) -> Any:
    """fbgemm's packed form of int8 weights with one scale per output channel."""
    if not cpu_supports_fbgemm_int8():
        raise ValueError("the fbgemm int8 kernel needs an x86 CPU with AVX2")
    with warnings.catch_warnings():
        # torch marks its quantized tensor types as deprecated; they are only this pack's input.
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch._make_per_channel_quantized_tensor(
            weight, scale.to(torch.float64), torch.zeros(weight.shape[0], dtype=torch.long), 0
        )
        return torch.ops.quantized.linear_prepack(quantized, None)


# Small tables (BERT's 2-row token-type and 512-row position tables) are added to *every* token,
# so their rounding error is a bias on the whole sequence: quantizing MiniLM's token-type table
# alone cost 0.0006 mean cosine, more than its 30522-row vocabulary table (0.00002). They are a
# few hundred KB, so they stay fp32.
_MIN_QUANTIZED_EMBEDDING_ROWS = 1024


def _quantize_rows(
    weight: torch.Tensor, pages: CheckpointPages
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row, in chunks of rows: a 262144 x 768 fp32 table never gets a
    full-size temporary, and each chunk of a memory-mapped weight is released once read."""
    rows, cols = weight.shape
    quantized = torch.empty((rows, cols), dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.float32)
    with torch.no_grad():
        for chunk in row_chunks(weight):
            block = weight[chunk].to(torch.float32)
            scale = block.abs().amax(dim=1) / 127.0
            # All-zero rows (padding embeddings) would divide by zero.
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            quantized[chunk] = torch.round(block / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            scales[chunk] = scale
            del block
            pages.release(weight[chunk])
    return quantized, scales


_SCRATCH = threading.local()


class Int8Linear(nn.Module):
    """Drop-in ``nn.Linear`` with int8 per-output-channel weights; fp32 in, fp32 out.

    Stores only int8 weights (+ one fp32 scale per output channel and the fp32 bias), so a
    quantized model never holds fp32 weight copies. See :data:`Int8Kernel` for the kernels.
    """

    # Buffers (registered below): declared so the checker sees tensors, not Module.__getattr__'s
    # Tensor | Module.
    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_sum: torch.Tensor | None
    bias: torch.Tensor | None

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
        self.packed_bytes = 0
        if kernel == "fbgemm":
            # fbgemm keeps its own packed copy; ours as well would double the int8 weights.
            self._packed = _fbgemm_pack(weight.contiguous(), weight_scale)
            self.packed_bytes = weight.numel()
        else:
            self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.to(torch.float32).contiguous())
        # The asymmetric activation offset contributes offset * sum_k(W[n, k]); precomputing the
        # per-channel sums keeps that to one rank-1 update per call.
        self.register_buffer(
            "weight_sum",
            weight.sum(dim=1, dtype=torch.int64).to(torch.float32).mul_(self.weight_scale)
            if kernel in ("dynamic_int8", "fbgemm")
            else None,
        )
        self.register_buffer(
            "bias", None if bias is None else bias.detach().to(torch.float32).clone()
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, kernel: Int8Kernel, pages: CheckpointPages | None = None
    ) -> Int8Linear:
        """Quantize ``linear`` (symmetric int8 per output channel).

        ``pages``: where ``linear`` lives in a memory-mapped checkpoint, to release as it is read.
        """
        weight, scale = _quantize_rows(linear.weight.detach(), pages or CheckpointPages.none())
        return cls(weight, scale, linear.bias, kernel=kernel)

    def __getattr__(self, name: str) -> Any:
        if name == "weight" and "_packed" in self.__dict__:
            # The fbgemm kernel holds the weights only packed; unpacked on request (inspection).
            return torch.ops.quantized.linear_unpack(self.__dict__["_packed"])[0].int_repr()
        return super().__getattr__(name)

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
        elif self.kernel == "fbgemm":
            y = self._fbgemm(x2d)
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

    def _fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_empty((0, self.out_features))
        low, step = _token_ranges(x, levels=127)
        # x ~= step * code + low, with code an integer in [0, 127] (see Int8Kernel).
        codes = (x - low).div_(step).round_().clamp_(0.0, 127.0)
        y: torch.Tensor = torch.ops.quantized.linear_dynamic(codes, self._packed, True)
        return self._add_offset_and_bias(y.mul_(step), low)

    def _dynamic_int8(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_empty((0, self.out_features))
        low, step = _token_ranges(x, levels=255)
        # x ~= step * q + offset with q in [-128, 127].
        offset = low.add_(step, alpha=128.0)
        quantized = (x - offset).div_(step).round_().clamp_(-128.0, 127.0).to(torch.int8)
        accumulated = torch._int_mm(quantized, self.weight.t())
        # Convert first: int32 * fp32 via type promotion was ~30x slower than to() + mul_.
        y = accumulated.to(torch.float32).mul_(step).mul_(self.weight_scale)
        return self._add_offset_and_bias(y, offset)

    def _add_offset_and_bias(self, y: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Adds what each token's offset contributes (offset * sum_k W[n, k]) and the bias."""
        assert self.weight_sum is not None  # registered for the kernels that quantize inputs
        y.addr_(offset.squeeze(1), self.weight_sum)
        if self.bias is not None:
            y.add_(self.bias)
        return y


def _token_ranges(x: torch.Tensor, *, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (row's) asymmetric range over `levels` steps: its low end (at most 0) and
    the step. Per token and asymmetric: post-GELU inputs are mostly positive, so a symmetric
    range would waste half the codes (measured: MiniLM mean cosine 0.9959 -> 0.9984). Separate
    amin/amax: torch.aminmax measured ~15x slower on CPU for these shapes."""
    low = x.amin(dim=1, keepdim=True).clamp_(max=0.0)
    high = x.amax(dim=1, keepdim=True).clamp_(min=0.0)
    return low, (high - low).clamp_(min=1e-12).div_(float(levels))


class Int8Embedding(nn.Module):
    """Drop-in ``nn.Embedding`` with int8 rows and one fp32 scale per row.

    Only the gathered rows are dequantized, so the lookup costs no more than the fp32 one.
    ``output_scale`` carries Gemma3's ``embed_scale`` (sqrt(hidden_size)) that
    ``Gemma3TextScaledWordEmbedding`` multiplies into every lookup.
    """

    weight: torch.Tensor  # buffers, declared as in Int8Linear
    row_scale: torch.Tensor

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
    def from_embedding(
        cls, embedding: nn.Embedding, *, pages: CheckpointPages | None = None
    ) -> Int8Embedding:
        """Quantize ``embedding``; keeps Gemma's ``embed_scale`` if present.

        ``pages``: where ``embedding`` lives in a memory-mapped checkpoint, to release as it is
        read.
        """
        scale_buffer = getattr(embedding, "embed_scale", None)
        output_scale = 1.0
        if scale_buffer is not None:
            output_scale = float(getattr(embedding, "scalar_embed_scale", scale_buffer))
        weight, row_scale = _quantize_rows(
            embedding.weight.detach(), pages or CheckpointPages.none()
        )
        return cls(weight, row_scale, padding_idx=embedding.padding_idx, output_scale=output_scale)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
            f"output_scale={self.output_scale:g}"
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = functional.embedding(input_ids, self.weight).to(torch.float32)
        return rows.mul_(functional.embedding(input_ids, self.row_scale[:, None]))


def _replace_children(root: nn.Module, kernel: Int8Kernel, pages: CheckpointPages) -> int:
    replaced = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            new: nn.Module | None = None
            if type(child) is nn.Linear:
                new = Int8Linear.from_linear(child, kernel=kernel, pages=pages)
            elif (
                isinstance(child, nn.Embedding)
                and child.weight.dim() == 2
                and child.num_embeddings >= _MIN_QUANTIZED_EMBEDDING_ROWS
                and child.max_norm is None  # renormalising lookups would rewrite int8 rows
            ):
                new = Int8Embedding.from_embedding(child, pages=pages)
            if new is not None:
                setattr(parent, name, new)
                replaced += 1
                del child
                release_freed_heap()
    return replaced


def quantize_model_int8(
    model: nn.Module, *, kernel: Int8Kernel | None = None, pages: CheckpointPages | None = None
) -> int:
    """Replace every ``nn.Linear`` and large ``nn.Embedding`` in ``model`` by int8 ones, in place.

    Layers are replaced one at a time, each read in chunks, and ``pages`` (the memory-mapped
    checkpoint the model was loaded from, if any) releases every chunk once quantized, so peak
    memory stays near one chunk above the quantized size. Remaining float tensors (norms,
    biases) are copied off the checkpoint's mmap so the fp32 file mapping can be closed. Returns
    how many modules were replaced.
    """
    chosen: Int8Kernel = kernel or default_int8_kernel()
    released = pages or CheckpointPages.none()
    with torch.no_grad():
        replaced = _replace_children(model, chosen, released)
        detach_from_checkpoint(model, pages=released, skip=(Int8Linear, Int8Embedding))
    return replaced
