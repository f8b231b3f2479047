"""Sliding-window attention's work under ring attention: the attention FLOPs a local layer
computes in a ring=2 prefill, over a global layer's at the same length (one-layer Gemma 3
models that differ only in the layer's type), counted by the kernels themselves
(toolkit.attention.kernels.counting_work: every pair a kernel call computes, masked ones
included), summed over the ranks.

Closed form: a query at position p sees min(p + 1, W) keys in a local layer and p + 1 in a
global one, so the ratio is sum_p min(p + 1, W) / sum_p (p + 1). Target: within 5% above it
(the blocks of W/32 queries each read the keys of their first and last query: ~3% more).
"""
from __future__ import annotations

from pathlib import Path

SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
             vocab_size=256, query_pre_attn_scalar=32)


def one_layer_gemma3(root, kind: str, window: int, positions: int) -> str:
    """A saved one-layer Gemma 3 whose layer is `kind` (sliding_attention or full_attention)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    folder = Path(root) / f"gemma3-{kind}-w{window}"
    if (folder / "config.json").is_file():
        return str(folder)
    config = Gemma3TextConfig(num_hidden_layers=1, layer_types=[kind], sliding_window=window,
                              max_position_embeddings=positions, bos_token_id=None, eos_token_id=None,
                              pad_token_id=None, **SHAPE)
    torch.manual_seed(0)
    tmp = folder.with_name(folder.name + ".tmp")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp)
    tmp.rename(folder)
    return str(folder)


def on_rank(folders: dict, n: int, chunk: int) -> dict:
    """FLOPs this rank's attention kernels computed in one prefill, per model."""
    import torch

    from toolkit import LongContextModel
    from toolkit.attention.kernels import counting_work

    ids = torch.randint(0, SHAPE["vocab_size"], (1, n), generator=torch.Generator().manual_seed(0))
    out = {}
    for kind, folder in folders.items():
        lcm = LongContextModel.from_pretrained(folder, ring=2, chunk_size=chunk, preflight=False)
        with counting_work() as work:
            lcm.prefill(ids)
        out[kind] = sum(work)
    return out


def closed_form(n: int, window: int) -> float:
    local = sum(min(p + 1, window) for p in range(n))
    return local / (n * (n + 1) / 2)


def swa_work(ranks, root, n: int, window: int, chunk: int) -> tuple[dict, list]:
    folders = {kind: one_layer_gemma3(root, kind, window, 2 * n) for kind in ("sliding_attention", "full_attention")}
    per_rank = ranks.run(on_rank, folders, n, chunk, timeout=1800)
    local = sum(r["sliding_attention"] for r in per_rank)
    full = sum(r["full_attention"] for r in per_rank)
    metrics = {"swa_ring_work_ratio": local / full, "swa_ring_work_ratio_closed_form": closed_form(n, window)}
    run = {"bench": "swa_work", "tokens": n, "window": window, "chunk_size": chunk, "ring": 2,
           "flops_local": local, "flops_global": full, "per_rank": per_rank, **metrics,
           "model": "one-layer Gemma 3 (random weights), local vs global layer"}
    return metrics, [run]
