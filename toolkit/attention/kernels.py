"""Local attention that also returns the log-sum-exp, and the merge of partial results.

Every parallel strategy reduces to: attend a block of queries to a block of keys, keep
(out, lse), merge partials. These functions are pure (no torch.distributed) so they can be
tested against a float64 reference in one process.

Conventions: q [B, H, Sq, d], k/v [B, G, Sk, d] with H % G == 0 (GQA: query head h reads
KV head h // (H/G)); out [B, H, Sq, d] in q's dtype; lse [B, H, Sq] in float32.
Causal masks are aligned bottom-right: query i sits at absolute position Sk - Sq + i.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

from ..backends import flash_attn_func

_WORK: contextvars.ContextVar[list | None] = contextvars.ContextVar("lctk_attention_work", default=None)


@contextlib.contextmanager
def counting_work():
    """Within, every attention kernel call appends the FLOPs it computes (QK^T and PV, masked
    pairs included) to the yielded list: what a layout or a window costs, counted, not modelled."""
    work: list[float] = []
    token = _WORK.set(work)
    try:
        yield work
    finally:
        _WORK.reset(token)


def count_work(flops: float) -> None:
    work = _WORK.get()
    if work is not None:
        work.append(flops)


def _empty_result(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    # [B, G, S, d] -> [B, G*groups, S, d]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attention_reference(q, k, v, causal: bool, scale: float | None = None):
    """Float64 ground truth: materialises the full score matrix (tests only)."""
    B, H, Sq, d = q.shape
    G, Sk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    q64, k64, v64 = q.double(), _repeat_kv(k.double(), H // G), _repeat_kv(v.double(), H // G)
    scores = q64 @ k64.transpose(-1, -2) * scale  # [B, H, Sq, Sk]
    if causal:
        qpos = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)
        kpos = torch.arange(Sk, device=q.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Sq]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = (probs @ v64).nan_to_num(0.0)
    return out, lse


def _cpu_flash(q, k, v, causal: bool, scale: float):
    """torch's CPU flash kernel (GQA natively); its is_causal is top-left aligned."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale
    )
    return out, lse.float()


def _cuda_flash_attn(q, k, v, causal: bool, scale: float):
    """flash-attn (bottom-right causal, GQA natively) on [B, S, H, d]."""
    out, lse, _ = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        softmax_scale=scale, causal=causal, return_attn_probs=True,
    )
    return out.transpose(1, 2), lse.float()


def _blockwise_math(q, k, v, causal: bool, scale: float, block: int = 1024):
    """Plain PyTorch fallback (fp32 on CUDA, other devices): query blocks bound the memory."""
    B, H, Sq, d = q.shape
    G, Sk = k.shape[1], k.shape[2]
    kk, vv = _repeat_kv(k, H // G), _repeat_kv(v, H // G)
    outs, lses = [], []
    for start in range(0, Sq, block):
        qb = q[:, :, start : start + block].float()
        scores = qb @ kk.float().transpose(-1, -2) * scale  # [B, H, b, Sk]
        if causal:
            qpos = torch.arange(start, start + qb.shape[2], device=q.device)[:, None] + (Sk - Sq)
            kpos = torch.arange(Sk, device=q.device)[None, :]
            scores = scores.masked_fill(kpos > qpos, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        outs.append((torch.exp(scores - lse[..., None]).nan_to_num(0.0) @ vv.float()).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _square_kernel(q, k, v, causal: bool, scale: float):
    """Dispatch for Sq == Sk or non-causal, where top-left and bottom-right agree."""
    if q.device.type == "cpu":
        return _cpu_flash(q, k, v, causal, scale)
    if q.device.type == "cuda" and flash_attn_func is not None and q.dtype in (torch.float16, torch.bfloat16):
        return _cuda_flash_attn(q, k, v, causal, scale)
    return _blockwise_math(q, k, v, causal, scale)


def attention_with_lse(q, k, v, causal: bool, scale: float | None = None):
    """Attention of q against k/v returning (out, lse); causal is bottom-right aligned."""
    Sq, Sk, d = q.shape[2], k.shape[2], q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    if Sq == 0 or Sk == 0:
        return _empty_result(q)
    count_work(q.shape[0] * attention_flops(Sq, Sk, q.shape[1], d, causal))
    if not causal or Sq == Sk:
        return _square_kernel(q, k, v, causal, scale)
    if Sq > Sk:
        raise ValueError(f"causal attention with more queries ({Sq}) than keys ({Sk}) leaves queries with nothing to attend")
    if q.device.type == "cuda" and flash_attn_func is not None and q.dtype in (torch.float16, torch.bfloat16):
        return _cuda_flash_attn(q, k, v, causal, scale)
    # Bottom-right causal = the prefix without a mask, merged with the square tail, causal.
    prefix = Sk - Sq
    out_a, lse_a = _square_kernel(q, k[:, :, :prefix], v[:, :, :prefix], False, scale)
    out_b, lse_b = _square_kernel(q, k[:, :, prefix:], v[:, :, prefix:], True, scale)
    out, lse = merge_partials(out_a.float(), lse_a, out_b, lse_b)
    return out.to(q.dtype), lse


DECODE_KEY_BLOCK = 32768  # keys per block on the masked path: bounds the score buffer at a million-token shard


def fold_query_rows(q: torch.Tensor, kv_heads: int, shared: bool) -> torch.Tensor:
    """GQA query heads (and, for a shared cache, the batch rows) become rows of their KV head.

    [B, G*r, Sq, d] -> [B, G, r*Sq, d]; shared (keys of batch 1 read by B rows) -> [1, G, B*r*Sq, d].
    Every KV head is then read once for all the rows that use it, by a kernel with equal head counts.
    """
    B, H, Sq, d = q.shape
    r = H // kv_heads
    if shared and B > 1:
        return q.reshape(B, kv_heads, r * Sq, d).transpose(0, 1).reshape(1, kv_heads, B * r * Sq, d)
    return q.reshape(B, kv_heads, r * Sq, d)


def unfold_query_rows(x: torch.Tensor, batch: int, heads: int, shared: bool) -> torch.Tensor:
    """The inverse of fold_query_rows for out [.., G, M, d] or lse [.., G, M] -> [B, H, Sq(, d)]."""
    kv_heads = x.shape[1]
    tail = x.shape[3:]
    if shared and batch > 1:  # [1, G, B*r*Sq, ...] -> [B, G, r*Sq, ...]
        x = x.reshape(kv_heads, batch, -1, *tail).transpose(0, 1)
    return x.reshape(batch, heads, -1, *tail)


def decode_attention(q, k, v, scale: float, key_lengths: torch.Tensor | None = None,
                     block: int = DECODE_KEY_BLOCK):
    """Few queries (a decode step) against a cache -> (out, lse), no causal mask.

    q [B, H, Sq, d]; k/v [Bk, G, L, d] with Bk in (B, 1): batch 1 is a cache shared by the B
    rows (a document under B questions), read once for all of them. key_lengths [B]
    (optional, a device tensor): row b sees only its first key_lengths[b] keys (padded
    per-row caches, static-shape decode). Shapes alone decide the work: no host sync, so
    the step can be captured in a CUDA graph.
    """
    B, H, Sq, d = q.shape
    Bk, G, L = k.shape[0], k.shape[1], k.shape[2]
    if L == 0:
        return _empty_result(q)
    shared = Bk == 1 and B > 1
    count_work(B * attention_flops(Sq, L, H, d, causal=False))
    if shared and key_lengths is not None:
        raise ValueError("key_lengths masks per-row caches (k/v of batch B), not a cache shared by the rows")
    qg = fold_query_rows(q, G, shared)  # [Bk, G, M, d]
    if key_lengths is None:
        out, lse = folded_decode(qg, k, v, scale)
    else:
        out, lse = _masked_blocks(qg, k, v, scale, key_lengths, block)
    return unfold_query_rows(out, B, H, shared).to(q.dtype), unfold_query_rows(lse, B, H, shared).float()


def folded_decode(qg, k, v, scale: float):
    """Folded queries qg [Bk, G, M, d] (fold_query_rows) against every key of k/v [Bk, G, L, d], L > 0
    -> (out [Bk, G, M, d], lse [Bk, G, M]): decode_attention's kernel, for a caller that folds the
    queries of many rows once (and counts their work)."""
    if qg.device.type == "cpu":
        return _cpu_decode(qg, k, v, scale)
    return _square_kernel(qg, k, v, False, scale)  # the fused kernel, reading each KV head once (no repeat, no mask)


MIN_SPLIT_KEYS = 1024  # keys per piece below which splitting the cache costs more than it balances


def _cpu_decode(qg, k, v, scale: float):
    """The CPU flash kernel shares out (batch x head) items over its threads; a decode step has
    few (3 KV heads on 2 threads: one thread does two). Cutting the keys into n pieces, laid
    side by side as a batch of n (a strided view, no copy), gives n times the items; the
    pieces' partials merge by LSE. qg [Bk, G, M, d], k/v [Bk, G, L, d] -> (out, lse)."""
    Bk, G, L, d = k.shape
    items, threads = Bk * G, torch.get_num_threads()
    n = min(-(-2 * threads // items), L // MIN_SPLIT_KEYS) if items < 2 * threads and Bk == 1 else 1
    if n <= 1 or k.stride(-1) != 1 or k.stride(-2) != d or v.stride(-1) != 1 or v.stride(-2) != d:
        return _cpu_flash(qg, k, v, False, scale)
    m = L // n
    pieces_k = k.as_strided((n, G, m, d), (m * d, k.stride(1), d, 1), k.storage_offset())  # [n, G, L/n, d]
    pieces_v = v.as_strided((n, G, m, d), (m * d, v.stride(1), d, 1), v.storage_offset())
    out, lse = _cpu_flash(qg.expand(n, -1, -1, -1), pieces_k, pieces_v, False, scale)  # [n, G, M, d], [n, G, M]
    total = torch.logsumexp(lse, dim=0, keepdim=True)                   # [1, G, M]: every piece has keys
    out = (torch.exp(lse - total)[..., None] * out).sum(0, keepdim=True)  # [1, G, M, d]
    if n * m < L:  # the last L mod n keys
        return merge_partials(out, total, *_cpu_flash(qg, k[:, :, n * m :], v[:, :, n * m :], False, scale))
    return out, total


def _masked_blocks(qg, k, v, scale: float, key_lengths: torch.Tensor, block: int):
    """qg [Bk, G, M, d] against k/v [Bk, G, L, d] where row b keeps keys < key_lengths[b]."""
    out = lse = None
    qf = qg.float()  # scores in fp32: bf16 scores of magnitude ~10 would be off by ~0.06 before exp
    for start in range(0, k.shape[2], block):
        kb, vb = k[:, :, start : start + block].float(), v[:, :, start : start + block].float()
        scores = torch.matmul(qf, kb.transpose(-1, -2)) * scale             # [Bk, G, M, b]
        pos = torch.arange(start, start + kb.shape[2], device=qg.device)
        hidden = pos[None, :] >= key_lengths[:, None]                      # [Bk, b]
        scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
        part_lse = torch.logsumexp(scores, dim=-1)                         # [Bk, G, M]
        probs = torch.exp(scores - part_lse[..., None]).nan_to_num(0.0)
        part = torch.matmul(probs, vb)                                     # [Bk, G, M, d]
        out, lse = (part.float(), part_lse) if out is None else merge_partials(out, lse, part, part_lse)
    return out, lse


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Stable merge of two partial attentions over disjoint keys (fp32 result).

    out = out_a - sigmoid(lse_b - lse_a) * (out_a - out_b); an all -inf partial (no keys)
    leaves the other one unchanged. out [B, H, S, d], lse [B, H, S].
    """
    out_a, out_b = out_a.float(), out_b.float()
    weight_b = torch.sigmoid(lse_b - lse_a).nan_to_num(0.0)  # both -inf -> nan -> 0
    out = out_a - weight_b[..., None] * (out_a - out_b)
    lse = torch.logaddexp(lse_a, lse_b)
    return out, lse


def merge_many(parts):
    """Merge an iterable of (out, lse) partials, left to right."""
    out, lse = None, None
    for o, l in parts:
        out, lse = (o.float(), l) if out is None else merge_partials(out, lse, o, l)
    if out is None:
        raise ValueError("merge_many needs at least one partial")
    return out, lse


def attention_flops(q_len: int, kv_len: int, heads: int, head_dim: int, causal: bool) -> float:
    """Multiply-add FLOPs of QK^T and PV (2 * 2 * Sq * Sk * H * d), halved where causal is square."""
    pairs = q_len * kv_len
    if causal:
        pairs = q_len * (kv_len - q_len) + q_len * (q_len + 1) / 2
    return 4.0 * pairs * heads * head_dim


__all__ = [
    "attention_with_lse", "attention_reference", "decode_attention", "merge_partials", "merge_many", "attention_flops",
    "counting_work",
]
