"""Serving one embedding request: limits, quota, model, charge, in that order.

Everything that can refuse a request (prompt, dimensions, size, rate limits, quota) runs before
the model; the charge and the usage row are written in one transaction before the response
leaves (`Meter.served`), so a served request is charged exactly once and a refused one not at
all (the view's meter logs it).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace

import numpy as np
from django.conf import settings

from accounts.metering.meter import Meter
from embeddings.encoder import InputTooLong, Tokenized, TokenPiece, TruncationDirection
from embeddings.runtime import Runtime, get_runtime
from embeddings.vectors import VectorShape
from embedplatform.error_codes import CATALOGUE
from embedplatform.errors import InvalidField, ServiceUnavailable


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: np.ndarray
    model: str
    dimensions: int
    # Tokens actually embedded (after truncation): what usage reports and the quota is charged.
    prompt_tokens: int
    # Per text: whether it was cut to the model's limit.
    truncated: list[bool]

    @property
    def truncated_count(self) -> int:
        return sum(self.truncated)


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


def input_param(param: str, index: int, count: int) -> str:
    """The name of one text of a request: `text` for /embed's only one, `texts[2]` otherwise."""
    return param if param == "text" or (param == "input" and count == 1) else f"{param}[{index}]"


def input_too_long(refusal: InputTooLong, *, param: str, count: int) -> Exception:
    return CATALOGUE["input_too_long"].error(
        param=input_param(param, refusal.index, count),
        tokens=f"at least {refusal.tokens}" if refusal.at_least else refusal.tokens,
        limit=refusal.limit,
    )


def chunks(tokenized: Tokenized, size: int) -> Iterator[Tokenized]:
    """`tokenized` in runs of at most `size` texts, in order."""
    for start in range(0, len(tokenized.inputs), size):
        window = slice(start, start + size)
        yield replace(
            tokenized,
            inputs=tokenized.inputs[window],
            token_counts=tokenized.token_counts[window],
            truncated=tokenized.truncated[window],
            input_token_counts=tokenized.input_token_counts[window],
            counted_in_full=tokenized.counted_in_full[window],
        )


def chunk_size(max_texts_in_flight: int | None) -> int:
    """Texts one request puts in the model's queue at a time: the original API's most texts per
    request (what the queue is sized for), and never more than the tenant may have in flight.
    A 2048-input request is then a run of chunks, each waited for before the next is queued, so
    it never holds more than one chunk's worth of the queue and is never refused for its size."""
    size = max(1, int(settings.MAX_TEXTS_PER_REQUEST))
    return size if max_texts_in_flight is None else max(1, min(size, max_texts_in_flight))


def embed(
    *,
    meter: Meter,
    texts: list[str],
    prompt_name: str | None = None,
    dimensions: int | None = None,
    normalize: bool = True,
    truncate: bool | None = None,
    truncation_direction: TruncationDirection = "right",
    param: str = "texts",
    max_texts: int | None = None,
) -> EmbeddingResult:
    """Serves one request that its meter has admitted (authenticated, counted against requests
    per minute). `max_texts` replaces the plan's texts per request (the OpenAI API's ceiling);
    `truncate` (None: TRUNCATE_INPUTS) false refuses an over-long input before any model work."""
    runtime = require_runtime()
    meter.check_inputs(count=len(texts), param=param, limit=max_texts)
    prompt = resolve_prompt(runtime, prompt_name)
    size = resolve_dimensions(runtime, dimensions)
    truncate = settings.TRUNCATE_INPUTS if truncate is None else truncate
    with meter.timed("tokenize"):
        try:
            tokenized = runtime.tokenize(
                texts, prompt=prompt, truncate=truncate, truncation_direction=truncation_direction
            )
        except InputTooLong as refusal:
            raise input_too_long(refusal, param=param, count=len(texts)) from refusal
    meter.reserve(tokens=tokenized.tokens)
    assert meter.limits is not None
    in_flight = meter.limits.max_texts_in_flight
    key = str(meter.tenant.pk)
    size_of_chunk = chunk_size(in_flight)
    shape = VectorShape(dimensions=size, normalize=normalize)
    try:
        if len(tokenized.inputs) <= size_of_chunk:  # the common case: one pass of the queue
            future = runtime.submit(tokenized, key=key, max_texts_in_flight=in_flight, shape=shape)
            shaped = meter.served_when_done(future, timeout=settings.ENCODE_TIMEOUT_SECONDS)
        else:
            shaped = np.empty((len(texts), size), dtype=np.float32)
            with meter.timed("model"):
                start = 0
                for chunk in chunks(tokenized, size_of_chunk):
                    end = start + len(chunk.inputs)
                    shaped[start:end] = runtime.embed(
                        chunk, key=key, max_texts_in_flight=in_flight, shape=shape
                    )
                    start = end
            meter.served()
    except FutureTimeout as exc:
        raise ServiceUnavailable(
            "The model is overloaded; try again shortly.", code="model_overloaded"
        ) from exc
    return EmbeddingResult(
        vectors=shaped,
        model=runtime.encoder.name,
        dimensions=size,
        prompt_tokens=meter.tokens,
        truncated=list(tokenized.truncated),
    )


def tokenize_texts(
    *, meter: Meter, texts: list[str], add_special_tokens: bool
) -> tuple[Runtime, list[list[TokenPiece]]]:
    """Each whole text's tokens with the served model's tokenizer (never truncated: a client
    chunking text to the model's limit needs to see how far over it is). Costs no tokens."""
    runtime = require_runtime()
    meter.check_inputs(count=len(texts), param="inputs")
    with meter.timed("tokenize"):
        pieces = runtime.encoder.token_pieces(texts, add_special_tokens=add_special_tokens)
    meter.served_uncharged()
    return runtime, pieces


def decode_ids(*, meter: Meter, rows: list[list[int]]) -> tuple[Runtime, list[str]]:
    """Each row of token ids of the served model back into text. Costs no tokens."""
    runtime = require_runtime()
    meter.check_inputs(count=len(rows), param="ids")
    vocab = runtime.encoder.vocab_size
    single = len(rows) == 1
    for index, row in enumerate(rows):
        for position, token_id in enumerate(row):
            if token_id >= vocab:
                param = f"ids[{position}]" if single else f"ids[{index}][{position}]"
                raise CATALOGUE["invalid_token_id"].error(
                    param=param, variant=2, token_id=token_id, last=vocab - 1
                )
    with meter.timed("tokenize"):
        texts = [runtime.encoder.decode_token_ids(row) for row in rows]
    meter.served_uncharged()
    return runtime, texts
