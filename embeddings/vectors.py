"""What a request asks of its vectors, applied by the model's thread to a whole forward pass.

The batcher shapes the rows of every request in a pass that asks for the same thing with one
array operation each, instead of each request thread doing the same on its own row: a handful of
numpy calls cost a request thread about 50 us in the metered path (`bench/request_cpu.py`), a
pass a few microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VectorShape:
    """The first `dimensions` of each vector (Matryoshka), then unit length if `normalize`."""

    dimensions: int
    normalize: bool

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        # Truncate first: a truncated unit vector is no longer one.
        vectors = np.ascontiguousarray(vectors[:, : self.dimensions], dtype=np.float32)
        if self.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return vectors
