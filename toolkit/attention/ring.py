"""Ring attention against a sequence-sharded KV cache: pass-KV, pass-Q and sharded decode.

Each ring rank r holds: its queries of the current chunk (piece r of the layout), the K/V
of that piece, and its shard of the cache (every cached position precedes the chunk, so
the cache is attended without a mask). Pieces attend each other by the block rule below.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .choices import RING_MODES
from .kernels import attention_flops, attention_with_lse, merge_many, merge_partials
from .kv_quant import StoredKV, attend_stored
from .layout import SequenceLayout

if TYPE_CHECKING:  # the comm object is passed in; attention never imports torch.distributed
    from ..distributed.comm import Comm


def choose_ring_mode(mode: str, new_tokens: int, cached_tokens: int, num_heads: int, num_kv_heads: int) -> str:
    """Meta's rule (arXiv:2411.01783, Alg. 1): pass-KV if T/(T+P) >= 2*G/H, else pass-Q."""
    if mode not in RING_MODES:
        raise ValueError(f"ring mode {mode!r} is unknown; use one of: {', '.join(RING_MODES)}")
    if mode != "auto":
        return mode
    ratio = new_tokens / max(new_tokens + cached_tokens, 1)
    return "pass-kv" if ratio >= 2 * num_kv_heads / num_heads else "pass-q"


def block_plan(q_owner: int, k_owner: int, zigzag: bool, q_len: int, k_len: int):
    """Which part of piece q_owner's queries attends which part of piece k_owner's keys.

    Zigzag pieces are [sub-chunk r | sub-chunk 2R-1-r]: diagonal -> causal; an earlier
    owner -> all queries see the first half of its keys; a later owner -> the second half
    of the queries sees all of its keys. Contiguous: earlier full, later nothing.
    Returns (q slice, k slice, causal) or None when nothing is attended.
    """
    every_q, every_k = slice(0, q_len), slice(0, k_len)
    if q_owner == k_owner:
        return every_q, every_k, True
    if not zigzag:
        return (every_q, every_k, False) if k_owner < q_owner else None
    if k_owner < q_owner:
        return every_q, slice(0, k_len // 2), False
    return slice(q_len // 2, q_len), every_k, False


def block_attention(q, k, v, q_owner: int, k_owner: int, zigzag: bool, scale: float):
    """Partial (out, lse) over all of q for one block of the ring (None: nothing attended)."""
    plan = block_plan(q_owner, k_owner, zigzag, q.shape[2], k.shape[2])
    if plan is None:
        return None
    qs, ks, causal = plan
    if qs.start == 0 and qs.stop == q.shape[2]:
        return attention_with_lse(q, k[:, :, ks], v[:, :, ks], causal=causal, scale=scale)
    part_out, part_lse = attention_with_lse(q[:, :, qs], k[:, :, ks], v[:, :, ks], causal=causal, scale=scale)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    out[:, :, qs], lse[:, :, qs] = part_out, part_lse
    return out, lse


def causal_work_per_rank(n: int, ring: int, zigzag: bool, heads: int = 1, head_dim: int = 1) -> list[float]:
    """Attention FLOPs each ring rank spends on one causal prefill of n tokens, counted
    from the same block plan that decides what runs."""
    layout = SequenceLayout("zigzag" if zigzag else "contiguous", ring=ring)
    piece = layout.padded_length(n) // ring
    work = []
    for me in range(ring):
        total = 0.0
        for src in range(ring):
            plan = block_plan(me, src, zigzag, piece, piece)
            if plan is not None:
                qs, ks, causal = plan
                total += attention_flops(qs.stop - qs.start, ks.stop - ks.start, heads, head_dim, causal)
        work.append(total)
    return work


def _zigzag_partials(zigzag: bool, scale: float):
    return lambda q, cache, k_piece, v_piece, q_owner, k_owner: _local_partials(
        q, cache, k_piece, v_piece, q_owner, k_owner, zigzag, scale)


def _local_partials(q, cache: StoredKV, k_piece, v_piece, q_owner, k_owner, zigzag, scale):
    """The cache (every position before the chunk: no mask, read a block at a time if it is
    quantised), then the piece by the block rule."""
    parts = []
    if cache.length:
        parts.append(attend_stored(q, cache, lambda q_, k, v, _start: attention_with_lse(q_, k, v, False, scale)))
    block = block_attention(q, k_piece, v_piece, q_owner, k_owner, zigzag, scale)
    if block is not None:
        parts.append(block)
    return parts


def _hop_message(cache: StoredKV, k_piece, v_piece):
    """What one hop of pass-KV carries -> (tensors, shapes for a cache of n keys, split(tensors, n)).
    A cache in the model's dtype and the piece go as ONE tensor [2, B, g, L + S, d], filled in
    place (a single message per hop); a quantised cache goes as it is stored (data and scales: a
    half or a quarter of the bytes) beside the piece at full precision."""
    b, g, s, d = k_piece.shape
    if cache.kind is None:
        held = cache.length
        kv = k_piece.new_empty((2, b, g, held + s, d))  # [2, B, g, L_me + S, d]
        for at, run in cache.segments():  # a shared document's keys, then the request's: filled in place
            n = run.length
            kv[0, :, :, at : at + n], kv[1, :, :, at : at + n] = run.k, run.v
        kv[0, :, :, held:], kv[1, :, :, held:] = k_piece, v_piece

        def split(tensors, n):
            (t,) = tensors
            return StoredKV(t[0, :, :, :n], t[1, :, :, :n]), t[0, :, :, n:], t[1, :, :, n:]

        return [kv], (lambda n: [(2, b, g, n + s, d)]), split
    tensors = cache.tensors() + [k_piece, v_piece]
    return (tensors, lambda n: cache.shapes(n) + [tuple(k_piece.shape)] * 2,
            lambda received, n: (cache.like(received[:-2]), received[-2], received[-1]))


def ring_pass_kv(q, k_piece, v_piece, cache: StoredKV, cache_lengths: list[int], zigzag: bool,
                 scale: float, group, comm: Comm, layer=None, partials=None):
    """K/V (cache shard + chunk piece) travel r -> r+1 for R-1 steps.

    q [B, h, S, d]; k/v pieces [B, g, S, d]; cache: this rank's shard as stored, cache_lengths[r]
    the keys of ring rank r's. Returns (out fp32 [B, h, S, d], lse [B, h, S]) for this rank's
    queries. partials(q, cache, k_piece, v_piece, q_owner, k_owner) -> [(out, lse)] replaces the
    block rule (attention decided by positions: sliding windows, soft-capping).
    """
    ring, me = comm.size(group), comm.rank(group)
    attend = partials or _zigzag_partials(zigzag, scale)
    message, shapes, split = _hop_message(cache, k_piece, v_piece)
    out = lse = None
    for step in range(ring):
        src = (me - step) % ring
        if step < ring - 1:
            wait, nxt = comm.ring_shift(message, group, tag="ring_kv", layer=layer,
                                        recv_shapes=shapes(cache_lengths[(src - 1) % ring]))
        for o, l in attend(q, *split(message, cache_lengths[src]), me, src):
            out, lse = (o.float(), l) if out is None else merge_partials(out, lse, o, l)
        if step < ring - 1:
            wait()
            # the finished send's handle still references the old buffers: drop both before
            # the next hop allocates, so at most two K/V buffers are ever alive (the planner's count)
            message, nxt, wait = nxt, None, None
    return out, lse


def ring_pass_q(q, k_piece, v_piece, cache: StoredKV, zigzag: bool, scale: float, group, comm: Comm, layer=None,
                partials=None):
    """Queries travel; partial (out, lse) go home in one all-to-all and merge there. partials: as
    in ring_pass_kv."""
    attend = partials or _zigzag_partials(zigzag, scale)
    ring, me = comm.size(group), comm.rank(group)
    b, h, s, d = q.shape
    results = torch.empty(ring, b, h, s, d + 1, dtype=torch.float32, device=q.device)  # [R(owner), B, h, S, d+1]
    visiting = q
    for step in range(ring):
        owner = (me - step) % ring
        if step < ring - 1:
            wait, (nxt,) = comm.ring_shift([visiting], group, tag="ring_q", layer=layer)
        parts = attend(visiting, cache, k_piece, v_piece, owner, me)
        if parts:
            o, l = merge_many(parts)
        else:
            o = torch.zeros(b, h, s, d, device=q.device)
            l = torch.full((b, h, s), float("-inf"), device=q.device)
        results[owner, ..., :d], results[owner, ..., d] = o, l
        if step < ring - 1:
            wait()
            visiting, nxt, wait = nxt, None, None
    back = comm.all_to_all(results, group, tag="ring_q_out", layer=layer)  # [R(computed on), B, h, S, d+1]
    return merge_many((back[r, ..., :d], back[r, ..., d]) for r in range(ring))


def ring_merge(out, lse, group, comm: Comm, layer=None):
    """Decode on a sequence-sharded cache: every ring rank's partial over its shard (out [B, h, S, d],
    lse [B, h, S]) -> the merged (out, lse), one all-gather. Same merge order on every rank, so
    every rank ends with bit-identical output."""
    d = out.shape[-1]
    packed = torch.cat([out.float(), lse.unsqueeze(-1)], dim=-1)  # [B, h, S, d+1]
    every = comm.all_gather(packed, group, tag="ring_decode", layer=layer)  # [R, B, h, S, d+1]
    return merge_many((every[r, ..., :d], every[r, ..., d]) for r in range(every.shape[0]))
