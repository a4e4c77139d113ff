"""Converting tensors off a memory-mapped checkpoint without holding the whole file resident.

transformers memory-maps safetensors, so a freshly loaded fp32 model costs almost nothing until
its tensors are read. Converting them (to int8 or bf16) reads every page, and each page read
stays counted in the worker's resident set until the mapping is closed at the very end: the
full-size EmbeddingGemma architecture peaked at about 2.2 GB while loading to settle at
0.8-1.1 GB. Here tensors are converted in chunks of rows, and each chunk's pages are dropped
from this process (``madvise(MADV_DONTNEED)``) as soon as they are converted, so the peak stays
near the converted size plus one chunk.

Dropping a page of a file mapping loses nothing as long as the page was never written: the next
read faults it in again from the file. Only mappings with no written (anonymous) page are
released, checked once in ``/proc/self/smaps`` before converting; anywhere that cannot be
checked (not Linux), nothing is released and only the peak is higher.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import cast

import torch
from torch import nn

__all__ = [
    "CHUNK_BYTES",
    "CheckpointPages",
    "converted_copy",
    "detach_from_checkpoint",
    "release_freed_heap",
    "row_chunks",
]

# Big enough that per-chunk overhead is noise, small enough to be negligible next to a model.
CHUNK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class _Mapping:
    start: int
    end: int


class CheckpointPages:
    """The read-only file mappings of this process whose pages may be dropped once read."""

    def __init__(self, mappings: list[_Mapping]) -> None:
        self._mappings = mappings
        self._page = mmap.PAGESIZE
        self._madvise = _libc_madvise() if mappings else None

    @classmethod
    def none(cls) -> CheckpointPages:
        """Releases nothing (tensors not loaded from a file, tests)."""
        return cls([])

    @classmethod
    def of_this_process(cls) -> CheckpointPages:
        """Every file mapping of this process that holds no written page right now."""
        return cls(list(_unwritten_file_mappings()))

    def release(self, tensor: torch.Tensor) -> None:
        """Drop from this process the whole pages that only ``tensor``'s bytes occupy.

        Pages shared with neighbouring tensors at either end are kept, so another tensor that is
        still being converted is never touched (dropping it would not corrupt it either, only
        cost a re-read).
        """
        if self._madvise is None or not tensor.is_contiguous() or tensor.numel() == 0:
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not any(m.start <= start and end <= m.end for m in self._mappings):
            return
        first = -(-start // self._page) * self._page
        last = end // self._page * self._page
        if last > first:
            self._madvise(first, last - first, mmap.MADV_DONTNEED)


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def release_freed_heap() -> None:
    """Hand heap pages freed so far back to the OS (glibc's ``malloc_trim``).

    Conversion temporaries of a few MB land in glibc's heap, which keeps freed pages: without
    trimming after each layer, int8 loading of the full-size EmbeddingGemma architecture peaked
    about 240 MB above where it settled.
    """
    with contextlib.suppress(AttributeError):
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    libc = _libc()
    madvise = getattr(libc, "madvise", None)
    if madvise is None:
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return cast("Callable[[int, int, int], int]", madvise)


def _unwritten_file_mappings() -> Iterator[_Mapping]:
    # smaps: a header line per mapping ("start-end perms offset dev inode path"), then its
    # counters; "Anonymous" counts pages written (copied on write) in a private file mapping.
    current: tuple[_Mapping, bool] | None = None
    with contextlib.suppress(OSError), open("/proc/self/smaps", encoding="ascii") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields:
                continue
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                low, _, high = fields[0].partition("-")
                is_file = len(fields) >= 6 and fields[5].startswith("/") and fields[4] != "0"
                current = (_Mapping(int(low, 16), int(high, 16)), is_file)
            elif fields[0] == "Anonymous:" and current is not None:
                mapping, is_file = current
                if is_file and fields[1] == "0":
                    yield mapping
                current = None


def row_chunks(tensor: torch.Tensor) -> Iterator[slice]:
    """Slices along the first dimension of about :data:`CHUNK_BYTES` each."""
    rows = tensor.shape[0] if tensor.dim() else 1
    row_bytes = max(1, tensor[0].numel() * tensor.element_size()) if tensor.dim() else 1
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, rows, step):
        yield slice(start, start + step)


def converted_copy(
    tensor: torch.Tensor, pages: CheckpointPages, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A copy of ``tensor`` with its own storage (cast to ``dtype``), releasing it as it goes."""
    target = torch.empty(tensor.shape, dtype=dtype or tensor.dtype)
    if tensor.dim() == 0:
        target.copy_(tensor)
        pages.release(tensor)
        return target
    for rows in row_chunks(tensor):
        target[rows].copy_(tensor[rows])
        pages.release(tensor[rows])
    return target


def detach_from_checkpoint(
    model: nn.Module,
    *,
    pages: CheckpointPages,
    dtype: torch.dtype | None = None,
    skip: tuple[type[nn.Module], ...] = (),
) -> None:
    """Give every parameter and buffer its own storage, optionally casting float parameters.

    Tensors loaded from safetensors are views into one mmap of the whole file, and a single
    surviving view keeps the entire fp32 file mapped (that is how an "int8" model ended up 16 MB
    larger than fp32, and bf16 larger than fp32). Only parameters are cast: buffers such as rotary
    ``inv_freq`` stay fp32, as when transformers loads with ``dtype=bf16``; Gemma's
    ``embed_scale`` buffer is cast to the weight dtype at use anyway. Modules of a ``skip`` type
    were built from fresh tensors already.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, skip):
                continue
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                target = dtype if (dtype is not None and param.is_floating_point()) else None
                module._parameters[name] = nn.Parameter(
                    converted_copy(param.detach(), pages, target), requires_grad=False
                )
                del param
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = converted_copy(buffer.detach(), pages)
