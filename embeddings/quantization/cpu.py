"""What this CPU computes natively, which decides ``auto`` and the int8 kernel."""

from __future__ import annotations

import platform
from functools import lru_cache

import torch

__all__ = ["cpu_supports_fbgemm_int8", "cpu_supports_int8_matmul", "cpu_supports_native_bf16"]


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


def cpu_supports_fbgemm_int8() -> bool:
    """Whether fbgemm's int8 GEMM runs here: x86 with AVX2 (its 8-bit multiply-add), in a torch
    built with fbgemm. The common case without VNNI: AMD Zen 2/3, Intel before Cascade Lake."""
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return False
    engines = set(torch.backends.quantized.supported_engines)
    return "avx2" in _cpu_flags() and bool(engines & {"x86", "fbgemm"})
