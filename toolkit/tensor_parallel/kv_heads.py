"""Tensor parallelism wider than the KV heads (Qwen2.5-1.5B: 2 KV heads; Llama-70B: 8 at tp=16).

AutoTP cuts attention projections in whole KV-head groups, so with fewer KV heads than TP
ranks some ranks would get none. Before AutoTP runs, each KV head of k_proj and v_proj is
repeated tp/G times (head g becomes heads g*r .. g*r + r - 1, r = tp/G, the order
repeat_interleave gives), so the projections have tp heads and AutoTP's even split hands TP rank
t the copy of KV head t*G/tp: the head its query heads (t*H/tp ..) read in GQA. The cost is
memory: every rank computes and caches one KV head instead of G/tp (the planner counts it).
Neither DeepSpeed nor transformers' own TP does this.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..models import head_dim

PROJECTIONS = ("k_proj", "v_proj")


@dataclass(frozen=True)
class KVRepeats:
    """A projection whose output heads (of head_dim rows each) are the checkpoint's KV heads,
    each repeated `repeats` times: row block j is a copy of head j // repeats."""

    repeats: int
    head_dim: int


def _grown(linear: torch.nn.Linear, heads: int, repeats: int, dim: int) -> torch.nn.Linear:
    """The projection with each of its `heads` output heads repeated `repeats` times."""
    out = torch.nn.Linear(linear.in_features, linear.out_features * repeats, bias=linear.bias is not None,
                          device=linear.weight.device, dtype=linear.weight.dtype)
    out.requires_grad_(False)
    if not linear.weight.is_meta:
        with torch.no_grad():
            w = linear.weight.view(heads, dim, linear.in_features).repeat_interleave(repeats, dim=0)
            out.weight.copy_(w.reshape(-1, linear.in_features))  # [G*r*d, h]
            if linear.bias is not None:
                out.bias.copy_(linear.bias.view(heads, dim).repeat_interleave(repeats, dim=0).reshape(-1))
    return out


@contextlib.contextmanager
def kv_heads_replicated(model, tp: int):
    """Inside: k_proj/v_proj grown to tp heads and config.num_key_value_heads == tp (what AutoTP
    splits by); yields {projection name: KVRepeats}, how the rows of the TP layer AutoTP puts
    under that name (it replaces modules in place) map to the checkpoint's (read by
    loading.shares). After: the config says G again."""
    config = model.config
    kv_heads = config.num_key_value_heads
    if kv_heads >= tp:
        yield {}
        return
    if any(hasattr(module, "qkv_proj") for module in model.modules()):
        raise ValueError(f"tensor parallel size {tp} exceeds the {kv_heads} KV heads of a fused qkv_proj "
                         f"(Phi-3): choose a TP size that divides {kv_heads}")
    repeats, dim, grown = tp // kv_heads, head_dim(config), {}
    for name, module in model.named_modules():
        for proj in PROJECTIONS:
            linear = getattr(module, proj, None)
            if isinstance(linear, torch.nn.Linear) and linear.out_features == kv_heads * dim:
                setattr(module, proj, _grown(linear, kv_heads, repeats, dim))
                grown[f"{name}.{proj}" if name else proj] = KVRepeats(repeats, dim)
    config.num_key_value_heads = tp
    try:
        yield grown
    finally:
        config.num_key_value_heads = kv_heads
