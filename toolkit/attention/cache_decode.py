"""A decode query against a reserved (fixed-capacity) cache whose first `lengths[b]` keys are live:
the attention of the static-shape decode step, which a CUDA graph captures once and replays.

With flash-attn (>= 2.6) on CUDA in fp16/bf16: `flash_attn_with_kvcache(q, k_cache, v_cache,
cache_seqlens=lengths, softmax_scale, causal=False, window_size=(W - 1, 0), softcap,
return_softmax_lse=True)`. It reads only each row's live keys (`cache_seqlens` is a device tensor:
capturable, replayed with new lengths), takes a window and soft-capping as its own arguments, and
returns the lse that merging over ring shards needs. It wants the cache as [B, cap, G, d], ours is
[B, G, cap, d]: the transpose is a view (it reads any row and head stride; only the last dim must
be contiguous). Without it: the keys [0, span) only (`span` a host bound on the lengths, kept fixed
while a graph replays), a block at a time, fp32 scores (bf16 scores of magnitude ~10 would be off
by ~0.06 before exp), keys past a row's length (and before its window) masked: the bytes read
follow the live length, not the capacity.

q [B, H, 1, d]; k/v [B, G, cap, d]; lengths [B] int32 on the device, the query at index lengths[b] - 1
(its own key the last live one); window W: it sees the W keys up to it. -> out [B, H, 1, d] in q's
dtype, lse [B, H, 1] fp32 (-inf for a row with no key).
"""
from __future__ import annotations

import torch

from ..backends import flash_attn_with_kvcache
from .kernels import attention_flops, count_work, fold_query_rows, merge_partials, unfold_query_rows

CACHE_KEY_BLOCK = 16384  # keys per block on the fallback: bounds its fp32 copy at a million-token shard


def flash_cache_kernel(q: torch.Tensor):
    """flash_attn_with_kvcache where it can run on q (CUDA, fp16/bf16, head dim a multiple of 8 up
    to 256: other head dims would make it pad a copy of the whole cache per call), else None."""
    d = q.shape[-1]
    if flash_attn_with_kvcache is None or q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    return flash_attn_with_kvcache if d % 8 == 0 and d <= 256 else None


def empty_rows_to_neg_inf(lse: torch.Tensor) -> torch.Tensor:
    """flash-attn gives a row that sees no key lse = +inf (and out 0); a merge needs -inf there."""
    return lse.float().masked_fill(lse == float("inf"), float("-inf"))


def cache_attention(q, k_cache, v_cache, lengths: torch.Tensor, scale: float, span: int,
                    window: int | None = None, softcap: float | None = None, kernel="auto"):
    """-> (out [B, H, 1, d], lse [B, H, 1]); no host sync, fixed shapes (see the module's note).
    kernel: "auto" (flash-attn's where it runs), None (the fallback), or a function with
    flash_attn_with_kvcache's signature (tests hold the call to the documented semantics)."""
    B, H, Sq, d = q.shape
    if kernel == "auto":
        kernel = flash_cache_kernel(q)
    if kernel is not None:
        count_work(B * attention_flops(Sq, span, H, d, causal=False))  # at most: the kernel stops at each length
        out, lse = kernel(q.transpose(1, 2),              # [B, 1, H, d]
                          k_cache.transpose(1, 2),        # [B, cap, G, d]: a view of [B, G, cap, d]
                          v_cache.transpose(1, 2),
                          cache_seqlens=lengths,          # int32 [B], on the device
                          softmax_scale=scale, causal=False,
                          window_size=(window - 1, 0) if window is not None else (-1, -1),
                          softcap=0.0 if softcap is None else float(softcap),
                          return_softmax_lse=True)
        return out.transpose(1, 2), empty_rows_to_neg_inf(lse)  # [B, H, 1, d], [B, H, 1]
    return _blocks(q, k_cache[:, :, :span], v_cache[:, :, :span], lengths, scale, window, softcap)


def _blocks(q, k, v, lengths, scale, window, softcap):
    """The fallback: q [B, H, 1, d] against k/v [B, G, span, d], row b seeing keys
    [lengths[b] - window, lengths[b])."""
    B, H, Sq, d = q.shape
    if Sq != 1:
        raise ValueError(f"cache_attention takes one query per row (a decode step), got {Sq}")
    block = CACHE_KEY_BLOCK
    G, L = k.shape[1], k.shape[2]
    count_work(B * attention_flops(Sq, L, H, d, causal=False))
    qf = fold_query_rows(q, G, shared=False).float()                  # [B, G, r, d]: a KV head's query rows
    length = lengths.view(B, 1).long()                                # [B, 1]
    out = lse = None
    for start in range(0, max(L, 1), block):
        kb, vb = k[:, :, start : start + block], v[:, :, start : start + block]
        scores = torch.matmul(qf, kb.float().transpose(-1, -2)) * scale  # [B, G, r, b]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        pos = torch.arange(start, start + kb.shape[2], device=q.device)[None, :]  # [1, b]
        hidden = pos >= length                                           # [B, b]
        if window is not None:
            hidden |= pos < length - window
        scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
        part_lse = torch.logsumexp(scores, dim=-1)                       # [B, G, r]
        probs = torch.exp(scores - part_lse[..., None]).nan_to_num(0.0)
        part = torch.matmul(probs, vb.float())                           # [B, G, r, d]
        out, lse = (part, part_lse) if out is None else merge_partials(out, lse, part, part_lse)
    return (unfold_query_rows(out, B, H, shared=False).to(q.dtype),
            unfold_query_rows(lse, B, H, shared=False).float())


__all__ = ["cache_attention", "flash_cache_kernel", "empty_rows_to_neg_inf"]
