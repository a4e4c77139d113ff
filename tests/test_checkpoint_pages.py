"""Loading a quantized model drops the memory-mapped fp32 checkpoint's pages as it converts them.

Without that, a worker holds the whole fp32 file resident while converting (the full-size
EmbeddingGemma architecture peaked at about twice its settled size). ``bench/load_memory.py``
prints the peak itself; these tests check the mechanism and that it never changes a value.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from embeddings.quantization import checkpoint, load_quantized_model
from embeddings.quantization.checkpoint import CheckpointPages, converted_copy

MIB = 2**20


def _mapped_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                inside = fields[-1] == str(path)
            elif inside and fields[:1] == ["Rss:"]:
                total += int(fields[1])
    return total


@pytest.fixture
def mapped(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A float32 file memory-mapped copy-on-write, as transformers maps safetensors."""
    values = torch.randn(8 * MIB // 4, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "weights.bin"
    path.write_bytes(values.numpy().tobytes())
    tensor = torch.from_file(str(path), shared=False, size=values.numel(), dtype=torch.float32)
    return path, tensor.view(-1, 1024), values.view(-1, 1024)


def test_it_drops_read_pages_and_reads_them_back_unchanged(
    mapped: tuple[Path, torch.Tensor, torch.Tensor],
) -> None:
    path, tensor, values = mapped
    assert torch.equal(tensor, values)  # reads every page
    assert _mapped_kb(path) >= 7 * 1024

    CheckpointPages.of_this_process().release(tensor)

    assert _mapped_kb(path) < 1024
    assert torch.equal(tensor, values)  # faulted in again from the file


def test_it_keeps_pages_of_a_mapping_that_was_written(
    mapped: tuple[Path, torch.Tensor, torch.Tensor],
) -> None:
    path, tensor, values = mapped
    tensor[0, 0] = 42.0  # a private copy of that page now exists only in memory
    assert torch.equal(tensor[1:], values[1:])
    resident = _mapped_kb(path)

    CheckpointPages.of_this_process().release(tensor)

    assert _mapped_kb(path) == resident
    assert tensor[0, 0].item() == 42.0


def test_it_leaves_tensors_outside_file_mappings_alone() -> None:
    tensor = torch.randn(1024, 1024)
    expected = tensor.clone()
    CheckpointPages.of_this_process().release(tensor)
    assert torch.equal(tensor, expected)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_it_converts_in_chunks_exactly(
    mapped: tuple[Path, torch.Tensor, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype | None,
) -> None:
    path, tensor, values = mapped
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 300 * 1024)  # many chunks, uneven last one

    copy = converted_copy(tensor, CheckpointPages.of_this_process(), dtype)

    assert copy.dtype == (dtype or torch.float32)
    assert torch.equal(copy, values.to(dtype or torch.float32))
    assert copy.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
    assert _mapped_kb(path) < 1024


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_it_releases_the_checkpoint_while_converting(
    gemma_tiny_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    released: list[int] = []
    madvise = checkpoint._libc_madvise()
    assert madvise is not None

    def recording(address: int, length: int, advice: int) -> int:
        released.append(length)
        return madvise(address, length, advice)

    monkeypatch.setattr(checkpoint, "_libc_madvise", lambda: recording)
    load_quantized_model(str(gemma_tiny_path), quantization=mode, token=None, max_seq_length=None)

    # Nearly all of the file is weights; only pages shared by two tensors are kept.
    checkpoint_bytes = (gemma_tiny_path / "model.safetensors").stat().st_size
    assert sum(released) > 0.8 * checkpoint_bytes
