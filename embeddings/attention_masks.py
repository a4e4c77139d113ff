"""Attention masks for bidirectional Gemma3 encoders (EmbeddingGemma), made by broadcasting.

Given a 2-D padding mask, transformers builds Gemma3's two 4-D masks (full attention, and the
bidirectional sliding window) through `torch.vmap` over Python mask functions, because its
bidirectional variant composes them with `or_mask_function`. That costs milliseconds of Python
per forward pass, more than the rest of a small model's pass for a short query. The masks
themselves are simple: a token sees every non-padding token (full layers), or those less than
`sliding_window` positions away (sliding layers). Built here with two comparisons and handed to
the model as the mapping its forward accepts, they are the same masks at a fraction of the cost.
"""

from __future__ import annotations

from typing import Any

# Attention implementations whose mask format is known here: sdpa takes booleans (True: attend),
# eager an additive float mask. Others (flash, flex) keep transformers' own mask code.
_FORMATS = ("sdpa", "eager")
_LAYER_TYPES = {"full_attention", "sliding_attention"}


def supports_fast_masks(model: Any) -> bool:
    """Whether `model` (the transformers model inside a sentence-transformers Transformer) is a
    bidirectional Gemma3 text model whose masks `bidirectional_masks` can build."""
    config = getattr(model, "config", None)
    return (
        config is not None
        and getattr(config, "model_type", "") == "gemma3_text"
        and bool(getattr(config, "use_bidirectional_attention", False))
        and getattr(config, "_attn_implementation", None) in _FORMATS
        and set(getattr(config, "layer_types", None) or ())
        <= {"full_attention", "sliding_attention"}
    )


def bidirectional_masks(model: Any, padding_mask: Any, dtype: Any) -> dict[str, Any]:
    """The {"full_attention", "sliding_attention"} masks, shaped (batch, 1, length, length), for
    a (batch, length) padding mask (1: a real token) and the model's compute dtype."""
    import torch

    config = model.config
    keys = padding_mask.bool()[:, None, None, :]
    length = padding_mask.shape[1]
    positions = torch.arange(length, device=padding_mask.device)
    window = (positions[:, None] - positions[None, :]).abs() < config.sliding_window
    masks = {"full_attention": keys, "sliding_attention": keys & window[None, None, :, :]}
    batch = padding_mask.shape[0]
    masks = {name: mask.expand(batch, 1, length, length) for name, mask in masks.items()}
    if config._attn_implementation == "eager":
        blocked = torch.finfo(dtype).min
        zero = torch.zeros((), dtype=dtype, device=padding_mask.device)
        masks = {name: torch.where(mask, zero, blocked) for name, mask in masks.items()}
    return masks
