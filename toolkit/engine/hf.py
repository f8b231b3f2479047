"""Hooks into transformers: our attention function and a mask function that builds nothing.

The per-request state (SequenceParallelAttention) reaches the function as the keyword
argument `lctk_state`, which transformers passes from `model(...)` down unchanged.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTENTION_NAME = "lctk_sequence_parallel"
STATE_KWARG = "lctk_state"


def sequence_parallel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, S, d], key/value [B, G, S, d] (after RoPE) -> ([B, S, H, d], None). A layer's
    `sliding_window` and `softcap` (Gemma, Mistral) come as keyword arguments from its module."""
    state = kwargs.get(STATE_KWARG)
    if state is None:
        raise RuntimeError(
            f"this model was parallelized by lctk and must be called through LongContextModel "
            f"(its attention needs the `{STATE_KWARG}` argument)"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if window is None and softcap is None:
        return state.attend(module.layer_idx, query, key, value, scale), None
    return state.attend(module.layer_idx, query, key, value, scale, window=window, softcap=softcap), None


def no_mask(*args, **kwargs):
    """Causality is handled inside our attention; never build an N x N mask."""
    return None


def register() -> str:
    AttentionInterface.register(ATTENTION_NAME, sequence_parallel_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, no_mask)
    return ATTENTION_NAME


def install(model) -> None:
    """Switch a loaded HF model to our attention (the weights are untouched)."""
    model.set_attn_implementation(register())
    pin_long_rope(model)


# ---- LongRoPE (Phi-3 / Phi-3.5) ------------------------------------------------------------
# transformers picks LongRoPE's long or short factors in every forward call from that call's
# largest position (long when max(position_ids) + 1 > original_max_position_embeddings). Chunked
# prefill and sequence parallelism cut one logical forward into calls with other largest
# positions (an early chunk, a zigzag piece), which would rotate some keys with the short factors
# and some with the long. Here the choice is made once per logical forward, as one unsharded
# forward would make it: by the whole prompt's length in prefill, by the token's in decode.
PINNED = "longrope (chosen per logical forward by lctk)"


@dataclass
class PinnedRope:
    """One rotary module whose factor choice is ours: the switch length, both factor sets, and
    the set its inv_freq holds now."""

    module: object
    switch: int
    short: torch.Tensor
    long: torch.Tensor
    active: torch.Tensor | None = None


# model -> its pinned rotary modules; kept here, not as attributes hung on the model
_PINNED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def pin_long_rope(model) -> int:
    """Take the factor choice away from transformers' per-call update. -> rotary modules pinned.

    The one write into a module besides our attention: its `rope_type` becomes PINNED, because
    transformers' own update runs only for "longrope" and it would otherwise choose per call."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    pinned = []
    for module in model.modules():
        if getattr(module, "rope_type", None) == "longrope" and hasattr(module, "original_inv_freq"):
            original = module.config.rope_parameters["original_max_position_embeddings"]
            long_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](module.config, module.inv_freq.device, seq_len=original + 1)
            pinned.append(PinnedRope(module, original, module.original_inv_freq.clone(),
                                     long_freq.to(module.inv_freq.dtype)))
            module.rope_type = PINNED
    _PINNED[model] = pinned
    return len(pinned)


def rope_for_length(model, seq_len: int) -> None:
    """The factors one forward of `seq_len` positions would use (a no-op for other RoPE types)."""
    for rope in _PINNED.get(model, ()):
        chosen = rope.long if seq_len > rope.switch else rope.short
        if rope.active is not chosen:
            rope.module.inv_freq.copy_(chosen)  # in place: a captured CUDA graph reads the same buffer
            rope.active = chosen


def long_rope_switch(model) -> int | None:
    """The length past which LongRoPE's long factors apply (None: no LongRoPE)."""
    pinned = _PINNED.get(model, ())
    return pinned[0].switch if pinned else None


def uses_positional_attention(config) -> bool:
    """Sliding-window or soft-capped attention in some layer (Gemma 2/3; Mistral, Phi-3 and
    Qwen's window on every layer when the config sets one shorter than the context: transformers
    masks by `sliding_window` whenever it is not None)."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return True
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return True
    window = getattr(config, "sliding_window", None)
    return window is not None and window < getattr(config, "max_position_embeddings", float("inf"))
