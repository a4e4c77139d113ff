"""The model as one TorchScript graph (`torch.jit.trace`): its backbone, and the modules after it
where every one of them can be traced; used only once it matched the eager model at load.

Why: eager PyTorch runs each op from Python, and gives the GIL up and takes it back around every
one. In a worker whose request threads run Python (parsing, metering, rendering), the model
thread then waits for the GIL at every op: on a 2-core AMD EPYC, a 1-text MiniLM pass took 23 ms
alone and 80 ms while four Python threads ran. A traced backbone runs all its ops in C++ under a
single release: 16 ms alone, 22 ms beside the same threads; and a 1-text pass of the tiny
EmbeddingGemma-architecture model, almost all per-op dispatch, fell from 5.3 to 2.5 ms.

Tracing records the ops that one example ran. A model whose Python code branches on shapes or
values could record a graph that is wrong for other inputs, so the graph is checked against the
eager model, end to end (pooling, Dense layers and normalization included), on inputs unlike the
example: one two-token text, a padded batch, and texts longer than a Gemma3 sliding window. Any
difference, or any failure to trace, leaves the model eager, and the reason is logged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The lengths (in tokens) of the texts of the example that is traced and of each check batch.
_EXAMPLE_LENGTHS = (6, 4)
_CHECK_LENGTHS = ((2,), (5, 3, 9))
# Beyond a sliding window, Gemma3's sliding layers mask differently: check one batch past it.
_DEFAULT_LONG_CHECK = 40
_RTOL = 1e-4
_ATOL = 1e-5

Features = dict[str, Any]
FeaturesOf = Callable[[list[list[int]]], Features]
ForwardFn = Callable[[Features], Features]


class TraceMismatch(RuntimeError):
    """The traced graph did not give the eager model's embeddings."""


@dataclass(frozen=True)
class TracedBackbone:
    """A traced graph of the backbone (the transformers model inside the sentence-transformers
    Transformer module), and of the modules after it where they can be traced too. `output` is
    the feature it makes: "sentence_embedding" when it holds the whole model, else
    "token_embeddings" (the other modules then run eagerly after it)."""

    graph: Any
    takes_token_types: bool
    output: str = "token_embeddings"

    def __call__(self, features: Features) -> Any:
        return self.graph(*_graph_inputs(features, self.takes_token_types))


def _graph_inputs(features: Features, takes_token_types: bool) -> list[Any]:
    """The graph's positional inputs, in the order it was traced with."""
    inputs = [features["input_ids"], features["attention_mask"]]
    if takes_token_types:
        inputs.append(features["token_type_ids"])
    return inputs


def traceable_backbone(model: Any) -> Any | None:
    """The transformers model whose last hidden state the first module hands on as token
    embeddings; None for a model laid out otherwise (those stay eager)."""
    modules = list(model.children())
    first = modules[0] if modules else None
    backbone = getattr(first, "model", None)
    text = (getattr(first, "modality_config", None) or {}).get("text") or {}
    output = text.get("method_output_name")
    if backbone is None or getattr(first, "module_output_name", "") != "token_embeddings":
        return None
    if text.get("method") != "forward" or output not in (
        "last_hidden_state",
        ("last_hidden_state",),
    ):
        return None
    if getattr(backbone.config, "output_hidden_states", False):
        return None  # all_layer_embeddings would be missing
    return backbone


# Modules after the backbone that work on tensors only, and so can be part of the graph. Pooling
# only when it pools the prompt's tokens too: otherwise it reads the prompt's length, a number
# per request that a graph would freeze.
_TRACEABLE_TAIL = ("Dense", "Normalize")


def traceable_tail(model: Any) -> list[Any]:
    """The modules after the backbone, when every one of them can be traced; else none."""
    tail = list(model.children())[1:]
    for module in tail:
        name = type(module).__name__
        pools_prompt = name == "Pooling" and getattr(module, "include_prompt", False) is True
        if not pools_prompt and name not in _TRACEABLE_TAIL:
            return []
    return tail


def trace_backbone(
    *,
    model: Any,
    features_of: FeaturesOf,
    eager_forward: ForwardFn,
    traced_forward: Callable[[TracedBackbone, Features], Features],
    max_length: int,
) -> TracedBackbone:
    """Traces the backbone of `model` (with the modules after it, where `traceable_tail` allows)
    and checks it against `eager_forward`; raises, with the reason, when it cannot be traced or
    does not match. `features_of` makes a batch's features from token id rows; `traced_forward`
    runs the model with the graph."""
    import torch

    from embeddings.attention_masks import bidirectional_masks, supports_fast_masks

    backbone = traceable_backbone(model)
    if backbone is None:
        raise TraceMismatch("the model's first module is not a text transformer to trace")
    fast_masks = supports_fast_masks(backbone)
    mask_dtype = backbone.get_input_embeddings().weight.dtype
    tail = traceable_tail(model)

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone: Any = backbone
            self.tail = torch.nn.ModuleList(tail)

        def forward(self, *inputs: Any) -> Any:
            input_ids, padding_mask = inputs[0], inputs[1]
            attention_mask = (
                bidirectional_masks(self.backbone, padding_mask, mask_dtype)
                if fast_masks
                else padding_mask
            )
            extra = {"token_type_ids": inputs[2]} if len(inputs) > 2 else {}
            out = self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, return_dict=False, **extra
            )
            # In fp32, as the hook of a half-precision backbone hands them on (quantization).
            features = {"token_embeddings": out[0].float(), "attention_mask": padding_mask}
            for module in self.tail:
                features = module(features)
            return features["sentence_embedding" if tail else "token_embeddings"]

    vocab = int(backbone.get_input_embeddings().weight.shape[0])
    generator = torch.Generator().manual_seed(0)

    def batch(lengths: tuple[int, ...]) -> Features:
        rows = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]
        return features_of(rows)

    example = batch(_EXAMPLE_LENGTHS)
    takes_token_types = "token_type_ids" in example
    inputs = tuple(_graph_inputs(example, takes_token_types))
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python branches: checked below
        graph = torch.jit.trace(Graph().eval(), inputs, check_trace=False)
    traced = TracedBackbone(
        graph=graph,
        takes_token_types=takes_token_types,
        output="sentence_embedding" if tail else "token_embeddings",
    )
    window = getattr(backbone.config, "sliding_window", None) or _DEFAULT_LONG_CHECK
    long = min(max_length, int(window) + 8)
    for lengths in (*_CHECK_LENGTHS, (long, 3)):
        features = batch(lengths)
        with torch.inference_mode():
            expected = eager_forward(dict(features))["sentence_embedding"]
            got = traced_forward(traced, dict(features))["sentence_embedding"]
        scale = max(1.0, float(expected.abs().max()))
        if got.shape != expected.shape or not torch.allclose(
            got.float(), expected.float(), rtol=_RTOL, atol=_ATOL * scale
        ):
            difference = float((got.float() - expected.float()).abs().max())
            raise TraceMismatch(
                f"the traced graph differs from the eager model by {difference:.3g} on texts of "
                f"{lengths} tokens"
            )
    return traced
