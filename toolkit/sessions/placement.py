"""Which positions and KV heads each rank's cache holds: what a rank of another layout reads
back from a saved cache. Pure; no torch process groups.

The cache itself records the global position of every key it holds (ascending per shard;
Ulysses ranks of one ring rank hold the same positions and different heads). A loaded cache
may place positions anywhere: attention to cached keys depends on their positions, not on
which shard holds them, so a load puts them contiguously, evenly over the ring ranks.
"""
from __future__ import annotations

import torch

from ..attention.ulysses import local_heads, replicate_kv_heads


def even_range(n: int, ring: int, ring_rank: int) -> tuple[int, int]:
    """[a, b): the contiguous positions ring rank r holds in a loaded cache (the first n % ring one more)."""
    base, extra = divmod(n, ring)
    a = ring_rank * base + min(ring_rank, extra)
    return a, a + base + (1 if ring_rank < extra else 0)


def kv_head_ids(kv_heads: int, tp: int, tp_rank: int, ulysses: int, ulysses_rank: int) -> list[int]:
    """Global KV head of each head this rank's cache holds: TP gives a rank G/tp contiguous heads
    (or, with more TP ranks than KV heads, the one its query heads read), then Ulysses splits them (repeating each first when there are fewer than ranks), computed by
    the very functions attention uses, applied to the head numbers."""
    if kv_heads >= tp:
        per_tp = kv_heads // tp
        ids = torch.arange(tp_rank * per_tp, (tp_rank + 1) * per_tp).view(1, per_tp, 1, 1)  # [1, G/tp, 1, 1]
    else:  # more TP ranks than KV heads: each holds a copy of the one its query heads read
        ids = torch.tensor([tp_rank * kv_heads // tp]).view(1, 1, 1, 1)
    mine = local_heads(replicate_kv_heads(ids, ulysses), ulysses, ulysses_rank)      # [1, G'/U, 1, 1]
    return mine.flatten().tolist()


def to_runs(positions: torch.Tensor) -> list[list[int]]:
    """Ascending positions -> [[start, length], ...] runs (a manifest stays small)."""
    runs: list[list[int]] = []
    for p in positions.tolist():
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return runs


def from_runs(runs) -> torch.Tensor:
    if not runs:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(s, s + n) for s, n in runs])
