"""Hooks into transformers: our attention function and a mask function that builds nothing.

The per-request state (SequenceParallelAttention) reaches the function as the keyword
argument `lctk_state`, which transformers passes from `model(...)` down unchanged.
"""
from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTENTION_NAME = "lctk_sequence_parallel"
STATE_KWARG = "lctk_state"


def sequence_parallel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, S, d], key/value [B, G, S, d] (after RoPE) -> ([B, S, H, d], None)."""
    state = kwargs.get(STATE_KWARG)
    if state is None:
        raise RuntimeError(
            f"this model was parallelized by lctk and must be called through LongContextModel "
            f"(its attention needs the `{STATE_KWARG}` argument)"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return state.attend(module.layer_idx, query, key, value, scale), None


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
