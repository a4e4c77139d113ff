"""Serving one embedding request: limits, quota, model, charge, in that order.

Everything that can refuse a request (prompt, dimensions, size, rate limits, quota) runs before
the model; the charge and the usage row are written in one transaction before the response
leaves, so a served request is charged exactly once and a refused one not at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from rest_framework.request import Request

from accounts import services as accounts
from accounts.models import Tenant
from accounts.ratelimit import RateLimitState, consume_tokens, refund_tokens
from accounts.selectors import Limits, effective_limits
from embeddings.runtime import Runtime, get_runtime
from embedplatform import metrics
from embedplatform.errors import (
    InvalidField,
    PayloadTooLarge,
    QuotaExceeded,
    ServiceUnavailable,
)


@dataclass
class MeteredCall:
    """One embed request as the usage log will see it."""

    request: Request
    caller: accounts.Caller | None
    endpoint: str
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    model: str = ""
    inputs: int = 0
    recorded: bool = False
    # The tenant's limits, worked out once with its rate-limit step.
    limits: Limits | None = None
    rate_limit: RateLimitState | None = None
    # Milliseconds per phase, sent back as Server-Timing so callers (and bench/) can see where a
    # request's time went: the identity layer versus the model.
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = (time.perf_counter() - started) * 1000.0
            self.timings[phase] = self.timings.get(phase, 0.0) + elapsed

    def server_timing(self) -> str:
        phases = [f"{name};dur={value:.2f}" for name, value in self.timings.items()]
        return ", ".join([*phases, f"total;dur={self.elapsed_ms():.2f}"])

    @property
    def tenant(self) -> Tenant:
        """The tenant the request acts for; set once authentication and permissions passed."""
        assert self.caller is not None
        assert self.caller.tenant is not None
        return self.caller.tenant

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0

    def usage_record(
        self, *, status_code: int, tokens: int = 0, error_type: str = ""
    ) -> accounts.UsageRecord:
        assert self.caller is not None
        return accounts.UsageRecord(
            caller=self.caller,
            endpoint=self.endpoint,
            model=self.model,
            inputs=self.inputs,
            tokens=tokens,
            status_code=status_code,
            latency_ms=self.elapsed_ms(),
            request_id=self.request_id,
            error_type=error_type,
        )


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
    call: MeteredCall,
    texts: list[str],
    prompt_name: str | None = None,
    dimensions: int | None = None,
    normalize: bool = True,
    param: str = "texts",
) -> EmbeddingResult:
    """Serves one authenticated request whose request-per-minute count was taken already
    (`accounts.ratelimit.count_request`, in the view)."""
    runtime = require_runtime()
    tenant = call.tenant
    limits = call.limits or effective_limits(tenant)
    call.inputs = len(texts)
    if len(texts) > limits.max_texts_per_request:
        raise PayloadTooLarge(
            f"A request may carry at most {limits.max_texts_per_request} texts; this one has "
            f"{len(texts)}.",
            code="too_many_inputs",
            param=param,
        )
    prompt = resolve_prompt(runtime, prompt_name)
    size = resolve_dimensions(runtime, dimensions)
    with call.timed("tokenize"):
        tokenized = runtime.tokenize(texts, prompt=prompt)
    tokens = tokenized.tokens
    with call.timed("ratelimit"):
        consume_tokens(state=call.rate_limit, tokens=tokens)
    try:
        with call.timed("quota"):
            accounts.check_quota(tenant=tenant, tokens=tokens)
        with call.timed("model"):
            vectors = runtime.embed(tokenized, key=str(tenant.pk))
        shaped = shape_vectors(vectors, dimensions=size, normalize=normalize)
        with call.timed("charge"):
            accounts.charge_and_log(record=call.usage_record(status_code=200, tokens=tokens))
    except BaseException as exc:
        # Not served: the minute's token budget gets its tokens back, and the view logs the
        # refusal with zero tokens.
        refund_tokens(state=call.rate_limit)
        if isinstance(exc, QuotaExceeded):
            metrics.QUOTA_EXCEEDED.inc()
        if isinstance(exc, FutureTimeout):
            raise ServiceUnavailable(
                "The model is overloaded; try again shortly.", code="model_overloaded"
            ) from exc
        raise
    call.recorded = True
    metrics.TOKENS.labels(endpoint=call.endpoint).inc(tokens)
    metrics.INPUTS.labels(endpoint=call.endpoint).inc(len(texts))
    return EmbeddingResult(
        vectors=shaped, model=runtime.encoder.name, dimensions=size, prompt_tokens=tokens
    )
