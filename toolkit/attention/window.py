"""Attention decided by positions: sliding windows (Gemma 2/3, Mistral) and soft-capped scores
(Gemma 2), for any set of queries against any set of keys, each with its global positions.

Key j is visible to query i iff k_pos[j] <= q_pos[i] and, with a window W, k_pos[j] > q_pos[i] - W
(transformers' sliding_window_overlay: W keys, the query's own included). Soft-capping replaces
each scaled score s by cap * tanh(s / cap) before the softmax.

Queries come in runs of consecutive positions (a prefill chunk, a zigzag piece is two, a decode
token one) and keys in ascending positions (a cache shard, then a chunk piece). Each run is cut
into blocks of queries; a block reads only the keys some query of it can see (a slice found by
binary search on the host: no device sync), so a windowed layer's work grows with N x W, not
N^2; blocks are small next to W, so the work done stays within a few percent of the band itself.
A block whose keys are all visible goes to the fused kernel (soft-capping: flash-attn's `softcap`,
or fp32 scores, unmasked); a decode query's block always is one. A partly masked block goes to
flash-attn with the band as its `window_size` where it runs (CUDA, fp16/bf16, >= 2.6) and the keys
hold consecutive positions, else to fp32 with a mask whose positions are built on the device from
their runs (aranges: no host-to-device copy, which on CUDA is a stream sync per layer and step).
"""
from __future__ import annotations

import torch

from ..backends import FLASH_SOFTCAP, flash_attn_func
from .cache_decode import empty_rows_to_neg_inf
from .kernels import _square_kernel, attention_flops, count_work, merge_partials

MIN_BLOCK = 16
SCORE_BUDGET = 1 << 24  # fp32 scores of one block: 64 MiB at most (a long cache against a chunk)


def query_block(window: int | None, run: int, rows_per_query: int, keys: int) -> int:
    """Queries per block: about W/32 under a window (the keys read past the band are then ~3%
    of it), and few enough that the block's scores stay within SCORE_BUDGET; at least 16."""
    block = run if window is None else max(MIN_BLOCK, window // 32)
    return max(1, min(run, block, max(MIN_BLOCK, SCORE_BUDGET // max(1, rows_per_query * keys))))


def runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """[start, stop) index ranges of consecutive positions (host tensor, ascending within runs)."""
    if positions.numel() == 0:
        return []
    breaks = ((positions[1:] - positions[:-1]) != 1).nonzero().flatten().tolist()
    starts = [0] + [b + 1 for b in breaks]
    return list(zip(starts, starts[1:] + [positions.numel()]))


def visible_keys(k_pos: torch.Tensor, first: int, last: int, window: int | None) -> tuple[int, int]:
    """[a, b): the keys (ascending positions) queries at positions first..last can see."""
    low = first - window + 1 if window is not None else None
    a = 0 if low is None else int(torch.searchsorted(k_pos, low))
    b = int(torch.searchsorted(k_pos, last, right=True))
    return a, max(a, b)


def flash_kernel(q: torch.Tensor):
    """flash_attn_func where it runs q with windows and soft-capping, else None."""
    if not FLASH_SOFTCAP or q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    return flash_attn_func


def flash_band(n: int, m: int, right: int, consecutive: bool, window: int | None):
    """flash-attn's window_size for n consecutive queries against m keys of consecutive positions, the
    last key `right` positions before the last query: it lets query i see keys j in [i + m - n + right
    - left, i + m - n + right], the band by position. None where it would read that otherwise (it takes
    a bound >= m as none: harmless on the left, not on the right)."""
    if not consecutive or right >= m:
        return None
    if window is None:
        return -1, right
    left = window - 1 - right
    return None if left < 0 else (left, right)


def flash_attention(flash, q, k, v, scale: float, window_size=(-1, -1), softcap: float | None = None):
    """flash-attn on q [B, H, n, d], k/v [B, G, m, d] (GQA natively) -> (out [B, H, n, d], lse [B, H, n])."""
    out, lse, _ = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, S, heads, d] views
                        softmax_scale=scale, causal=False, window_size=window_size,
                        softcap=0.0 if softcap is None else float(softcap), return_attn_probs=True)
    return out.transpose(1, 2), empty_rows_to_neg_inf(lse)


def device_positions(positions: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host positions [n] on `device`, built there run by run: no host-to-device copy."""
    if device.type == "cpu":
        return positions
    parts = [torch.arange(int(positions[a]), int(positions[a]) + b - a, device=device) for a, b in runs(positions)]
    if not parts:
        return torch.empty(0, dtype=torch.long, device=device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def masked_attention(q, k, v, q_pos, k_pos, scale: float, window: int | None, softcap: float | None):
    """fp32 scores with the position mask (and soft-capping) -> (out, lse); q [B, G, M, d] with
    M = r * Sq rows (the r query heads of each KV head folded in, head-major: row = head * Sq +
    query), k/v [B, G, Sk, d]; q_pos [Sq], k_pos [Sk] on the device, or both None: no mask."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale    # [B, G, M, Sk]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if q_pos is not None:
        seen = k_pos[None, :] <= q_pos[:, None]                              # [Sq, Sk]
        if window is not None:
            seen &= k_pos[None, :] > q_pos[:, None] - window
        seen = seen.repeat(q.shape[2] // q_pos.numel(), 1)                   # [M, Sk]: the rows are head-major
        scores = scores.masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                    # [B, G, M]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return torch.matmul(probs, v.float()), lse


def _every_key_seen(qb, kb, vb, scale: float, softcap: float | None, flash):
    """qb [B, G, M, d] rows that see every key of kb/vb [B, G, m, d]."""
    if softcap is None:
        return _square_kernel(qb, kb, vb, False, scale)
    if flash is not None:
        return flash_attention(flash, qb, kb, vb, scale, softcap=softcap)
    return masked_attention(qb, kb, vb, None, None, scale, None, softcap)


def positional_attention(q, k, v, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
                         window: int | None = None, softcap: float | None = None, flash="auto"):
    """q [B, H, Sq, d], k/v [B, G, Sk, d]; q_pos [Sq], k_pos [Sk] (host int64, keys ascending)
    -> (out [B, H, Sq, d] fp32, lse [B, H, Sq]); rows that see no key get lse -inf. flash: "auto"
    (flash-attn where it runs), None, or a function with flash_attn_func's signature (tests)."""
    B, H, Sq, d = q.shape
    G = k.shape[1]
    r = H // G
    out = torch.zeros(B, H, Sq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    if Sq == 0 or k.shape[2] == 0:
        return out, lse
    if flash == "auto":
        flash = flash_kernel(q)
    for start, stop in runs(q_pos):
        step = query_block(window, stop - start, B * H, k.shape[2])
        for a in range(start, stop, step):
            b = min(stop, a + step)
            first, last = int(q_pos[a]), int(q_pos[b - 1])
            lo, hi = visible_keys(k_pos, first, last, window)
            if hi == lo:
                continue
            kb, vb = k[:, :, lo:hi], v[:, :, lo:hi]
            k_first, k_last = int(k_pos[lo]), int(k_pos[hi - 1])
            band = None if flash is None else flash_band(b - a, hi - lo, last - k_last,
                                                         k_last - k_first == hi - lo - 1, window)
            if k_last <= first and (window is None or k_first > last - window):  # every query sees every key
                qb = q[:, :, a:b].reshape(B, G, r * (b - a), d)  # [B, G, r*n, d]: query heads of a KV head as rows
                o, l = _every_key_seen(qb, kb, vb, scale, softcap, flash)
            elif band is not None:
                o, l = flash_attention(flash, q[:, :, a:b], kb, vb, scale, band, softcap)  # [B, H, n, d], [B, H, n]
            else:
                qb = q[:, :, a:b].reshape(B, G, r * (b - a), d)
                o, l = masked_attention(qb, kb, vb, device_positions(q_pos[a:b], q.device),
                                        device_positions(k_pos[lo:hi], q.device), scale, window, softcap)
            out[:, :, a:b] = o.float().reshape(B, H, b - a, d)
            lse[:, :, a:b] = l.reshape(B, H, b - a)
            count_work(B * attention_flops(b - a, hi - lo, H, d, causal=False))  # every pair of the block
    return out, lse


def merge_into(out, lse, part):
    """Merge a partial into a running (out, lse); either may be None."""
    if part is None:
        return out, lse
    if out is None:
        return part[0].float(), part[1]
    return merge_partials(out, lse, *part)


__all__ = ["positional_attention", "masked_attention", "flash_band", "device_positions", "runs", "visible_keys",
           "merge_into"]
