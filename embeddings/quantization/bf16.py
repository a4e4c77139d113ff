"""bf16 linears whose weights are packed once, at load, for oneDNN.

A plain bf16 ``nn.Linear`` hands oneDNN its weight in PyTorch's row-major layout, and oneDNN
reorders it into its blocked (AMX / AVX512-BF16) layout on every call. For the small passes of
online traffic that reorder is most of a layer's time: measured on a Sapphire Rapids core with
MiniLM's 384x1536 layer and 16 rows, 136 us plain against 77 us packed (1.3-1.8x across its
layers); a whole MiniLM pass 15% faster at batch 1-4, the same at batch 32. Packing once, at
load, is what ``torch.compile``'s freezing does for CPU; here without compiling anything. The
results are the same numbers as the plain layer's (same kernel, same accumulation); tested.

The packed weight is a (non-persistent) buffer so that `torch.jit.trace` keeps it as the graph's
state: as a plain attribute the tracer would have to bake it in as a constant, which it cannot
do for a oneDNN tensor, and the whole bf16 model would stay eager (embeddings/tracing.py).
"""

from __future__ import annotations

import torch
from torch import nn

from embeddings.quantization.cpu import cpu_supports_native_bf16

__all__ = ["PackedBf16Linear", "bf16_packing_available", "pack_bf16_linears"]

# The tracer cannot record the op's `Scalar?[]` argument from Python; TorchScript can, so a
# traced forward calls the op through this compiled function (`number` is TorchScript's own).
_SCRIPTED = torch.jit.CompilationUnit(
    """
def packed_linear(x: Tensor, packed: Tensor, bias: Optional[Tensor]) -> Tensor:
    no_scalars = torch.jit.annotate(List[Optional[number]], [])
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", no_scalars, "")
"""
)


def bf16_packing_available() -> bool:
    """Whether this torch and CPU run oneDNN's packed bf16 linear natively."""
    mkldnn = torch.ops.mkldnn
    return (
        cpu_supports_native_bf16()
        and torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
        and bool(mkldnn._is_mkldnn_bf16_supported())
    )


class PackedBf16Linear(nn.Module):
    """Drop-in bf16 ``nn.Linear`` holding its weight only in oneDNN's packed layout."""

    bias: torch.Tensor | None
    _packed: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().to(torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.register_buffer("_packed", packed, persistent=False)
        self.packed_bytes = weight.numel() * weight.element_size()
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16).clone()
        self.register_buffer("bias", bias)

    @property
    def weight(self) -> torch.Tensor:
        """A plain copy, for code that inspects a layer (dtype, shape)."""
        dense: torch.Tensor = self._packed.to_dense()
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            traced: torch.Tensor = _SCRIPTED.packed_linear(x, self._packed, self.bias)
            return traced
        output: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self._packed, self.bias, "none", [], ""
        )
        return output

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_bf16_linears(module: nn.Module) -> int:
    """Replaces every bf16 ``nn.Linear`` inside ``module`` by a packed one; how many."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, PackedBf16Linear(child))
                replaced += 1
    return replaced
