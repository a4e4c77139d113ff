"""Serving one embedding request: limits, quota, model, charge, in that order.

Everything that can refuse a request (prompt, dimensions, size, rate limits, quota) runs before
the model; the charge and the usage row are written in one transaction before the response
leaves (`Meter.served`), so a served request is charged exactly once and a refused one not at
all (the view's meter logs it).
"""

from __future__ import annotations

from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from accounts.metering.meter import Meter
from embeddings.runtime import Runtime, get_runtime
from embedplatform.errors import InvalidField, ServiceUnavailable


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: np.ndarray
    model: str
    dimensions: int
    prompt_tokens: int


def require_runtime() -> Runtime:
    runtime = get_runtime()
    if runtime is None:
        raise ServiceUnavailable("The model is not loaded yet.", code="model_not_ready")
    return runtime


def resolve_prompt(runtime: Runtime, prompt_name: str | None) -> str:
    prompts = runtime.encoder.prompts
    if prompt_name is None:
        default = runtime.encoder.default_prompt_name
        return prompts.get(default, "") if default else ""
    if prompt_name not in prompts:
        names = ", ".join(sorted(prompts)) or "none"
        raise InvalidField(
            f"Unknown prompt_name {prompt_name!r}; this model's prompts are: {names}.",
            code="invalid_prompt_name",
            param="prompt_name",
        )
    return prompts[prompt_name]


def resolve_dimensions(runtime: Runtime, dimensions: int | None) -> int:
    native = runtime.encoder.dimensions
    if dimensions is None:
        return native
    if not 1 <= dimensions <= native:
        raise InvalidField(
            f"dimensions must be between 1 and {native} for this model, not {dimensions}.",
            code="invalid_dimensions",
            param="dimensions",
        )
    return dimensions


def shape_vectors(vectors: np.ndarray, *, dimensions: int, normalize: bool) -> np.ndarray:
    """Matryoshka truncation, then unit length (a truncated unit vector is no longer one)."""
    vectors = np.ascontiguousarray(vectors[:, :dimensions], dtype=np.float32)
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors


def embed(
    *,
    meter: Meter,
    texts: list[str],
    prompt_name: str | None = None,
    dimensions: int | None = None,
    normalize: bool = True,
    param: str = "texts",
) -> EmbeddingResult:
    """Serves one request that its meter has admitted (authenticated, counted against requests
    per minute)."""
    runtime = require_runtime()
    meter.check_inputs(count=len(texts), param=param)
    prompt = resolve_prompt(runtime, prompt_name)
    size = resolve_dimensions(runtime, dimensions)
    with meter.timed("tokenize"):
        tokenized = runtime.tokenize(texts, prompt=prompt)
    meter.reserve(tokens=tokenized.tokens)
    try:
        with meter.timed("model"):
            vectors = runtime.embed(tokenized, key=str(meter.tenant.pk))
    except FutureTimeout as exc:
        raise ServiceUnavailable(
            "The model is overloaded; try again shortly.", code="model_overloaded"
        ) from exc
    shaped = shape_vectors(vectors, dimensions=size, normalize=normalize)
    meter.served()
    return EmbeddingResult(
        vectors=shaped, model=runtime.encoder.name, dimensions=size, prompt_tokens=meter.tokens
    )
