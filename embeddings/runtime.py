"""The model, loaded once per process, and the one door through which requests reach it.

A gunicorn worker loads the model before its first request (embedplatform/serving.py); requests
then go through `get_runtime()`: `Runtime.tokenize` tokenizes a request's texts once (cut to
what the model can read, see `Tokenized`), and `Runtime.embed` hands those tokens to the batcher,
which shares forward passes fairly between requests and tenants. Unit tests install a fake
encoder with `install_runtime`.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future

import numpy as np
from django.conf import settings

from embeddings.batching import Batcher
from embeddings.encoder import (
    Encoder,
    Tokenized,
    TruncationDirection,
    load_encoder,
    torch_threads,
)
from embeddings.vectors import VectorShape
from embedplatform import metrics
from embedplatform.shutdown import wait_for_result

logger = logging.getLogger(__name__)


def accepted_model_names(served: str) -> set[str]:
    """Names under which /v1/embeddings accepts the served model."""
    names = {served, served.rsplit("/", 1)[-1], *settings.MODEL_ALIASES}
    if settings.MODEL_NAME:
        names.add(settings.MODEL_NAME)
    return {n for n in names if n}


class Runtime:
    """The process's encoder and batcher: tokenize a request's texts once, then embed them."""

    def __init__(self, encoder: Encoder, *, max_batch_size: int) -> None:
        self.encoder = encoder
        self.batcher = Batcher(
            encoder.encode_tokenized,
            max_batch_size=max_batch_size,
            max_batch_tokens=settings.BATCH_MAX_TOKENS,
            wait_seconds=settings.BATCH_WAIT_MS / 1000.0,
            gather_seconds=settings.BATCH_GATHER_MS / 1000.0,
            max_queued_texts=settings.BATCH_QUEUE_MAX_TEXTS,
            max_queued_tokens=settings.BATCH_QUEUE_MAX_TOKENS,
        )

    def tokenize(
        self,
        texts: list[str],
        *,
        prompt: str,
        truncate: bool = True,
        truncation_direction: TruncationDirection = "right",
    ) -> Tokenized:
        """Tokenizes `texts` as the model will read them (see `Tokenized`). With
        `truncate=False` an input longer than the model reads raises `InputTooLong` here,
        before any model work; otherwise it is cut on the side `truncation_direction` names
        (`right` keeps the start, `left` the end; the prompt is always kept)."""
        if truncation_direction not in ("right", "left"):
            raise ValueError(
                f"truncation_direction must be right or left, not {truncation_direction!r}"
            )
        tokenized = self.encoder.tokenize(
            texts, prompt=prompt, truncation_direction=truncation_direction
        )
        if not truncate and (refusal := tokenized.first_too_long()) is not None:
            raise refusal
        return tokenized

    def submit(
        self,
        tokenized: Tokenized,
        *,
        key: str = "",
        max_texts_in_flight: int | None = None,
        shape: VectorShape | None = None,
    ) -> Future[np.ndarray]:
        """Queues `tokenized` for the model: one row per text, in the future, shaped as `shape`
        asks (None: as the model made it). `key` (the tenant) shares forward passes fairly
        between tenants; `max_texts_in_flight` caps that key's texts waiting in this worker.
        Raises `ModelOverloaded` (503) or `TooManyTextsInFlight` (429) at once when the
        worker's queue cannot take the texts."""
        return self.batcher.submit(
            tokenized.inputs,
            prompt=tokenized.prompt,
            token_counts=tokenized.token_counts,
            key=key,
            max_texts_in_flight=max_texts_in_flight,
            shape=shape,
        )

    def embed(
        self,
        tokenized: Tokenized,
        *,
        key: str = "",
        max_texts_in_flight: int | None = None,
        shape: VectorShape | None = None,
    ) -> np.ndarray:
        """`submit`, and the answer; `FutureTimeout` after ENCODE_TIMEOUT_SECONDS."""
        future = self.submit(
            tokenized, key=key, max_texts_in_flight=max_texts_in_flight, shape=shape
        )
        return wait_for_result(future, settings.ENCODE_TIMEOUT_SECONDS)

    def close(self) -> None:
        self.batcher.close()


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime() -> Runtime | None:
    return _runtime


def install_runtime(
    encoder: Encoder | None, *, max_batch_size: int | None = None
) -> Runtime | None:
    """Makes `encoder` the process's model (None unloads it). Returns the new runtime."""
    global _runtime
    with _lock:
        if _runtime is not None:
            _runtime.close()
        _runtime = (
            Runtime(encoder, max_batch_size=max_batch_size or settings.MAX_BATCH_SIZE)
            if encoder is not None
            else None
        )
        return _runtime


def ensure_loaded() -> Runtime:
    """Loads the configured model once per process; later calls return the same runtime."""
    global _runtime
    with _lock:
        if _runtime is not None:
            return _runtime
        encoder = load_encoder(
            model_name=settings.MODEL_NAME,
            quantization=settings.MODEL_QUANTIZATION,
            max_seq_length=settings.MAX_SEQ_LENGTH,
            hf_token=settings.HF_TOKEN,
            cache_folder=settings.HF_HOME,
        )
        _runtime = Runtime(encoder, max_batch_size=settings.MAX_BATCH_SIZE)
    metrics.MODEL_INFO.labels(
        model=encoder.name, dtype=encoder.dtype, dimensions=str(encoder.dimensions)
    ).set(1)
    metrics.MODEL_LOAD_SECONDS.set(encoder.load_seconds)
    logger.info(
        "model_loaded_successfully",
        extra={
            "model": encoder.name,
            "dtype": encoder.dtype,
            "graph": "traced" if encoder.traced is not None else "eager",
            "dimensions": encoder.dimensions,
            "max_seq_length": encoder.max_seq_length,
            "seconds": round(encoder.load_seconds, 3),
            "torch_threads": torch_threads(),
            "pid": os.getpid(),
        },
    )
    return _runtime
