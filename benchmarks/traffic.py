"""Closed-form bytes each rank sends per layer in one prefill, for each SP strategy.

These mirror the algorithms exactly (padding, KV-head replication, cache shards), so the
comm counters can be checked against them to the byte, in tests and in benchmarks.
"""
from __future__ import annotations

from toolkit.attention.layout import SequenceLayout, chunk_spans


def _replicated_kv_heads(kv_heads: int, ulysses: int) -> int:
    return kv_heads if kv_heads % ulysses == 0 else ulysses


def ulysses_bytes_per_layer(n: int, chunk: int, ulysses: int, heads: int, kv_heads: int, head_dim: int,
                            elem: int, ring: int = 1, layout: str = "zigzag") -> int:
    """q, k, v in and out back: each all-to-all keeps 1/P of the local shard at home."""
    if ulysses == 1:
        return 0
    lay = SequenceLayout(layout, ring, ulysses)
    g = _replicated_kv_heads(kv_heads, ulysses)
    total = 0
    for start, end in chunk_spans(n, chunk):
        s_loc = lay.padded_length(end - start) // (ring * ulysses)
        total += (2 * heads + 2 * g) * s_loc * head_dim * elem * (ulysses - 1) // ulysses
    return total


def ring_bytes_per_layer(n: int, chunk: int, ring: int, heads: int, kv_heads: int, head_dim: int, elem: int,
                         mode: str, me: int, ulysses: int = 1, layout: str = "zigzag",
                         cached_token_bytes: int | None = None) -> int:
    """pass-kv: (cache shard + chunk piece) of K and V, R-1 hops; pass-q: the queries R-1
    hops, then (out, lse) in fp32 for R-1 owners. Heads are those after Ulysses.
    cached_token_bytes: a cached token's K per KV head as the cache stores it (quantised: data
    and scale); the chunk's own piece always travels at full precision."""
    cached_bytes = head_dim * elem if cached_token_bytes is None else cached_token_bytes
    lay = SequenceLayout(layout, ring, ulysses)
    h, g = heads // ulysses, _replicated_kv_heads(kv_heads, ulysses) // ulysses
    shard = [0] * ring
    total = 0
    for start, end in chunk_spans(n, chunk):
        n_pad = lay.padded_length(end - start)
        piece = n_pad // ring
        if mode == "pass-kv":
            for step in range(ring - 1):
                total += 2 * g * (shard[(me - step) % ring] * cached_bytes + piece * head_dim * elem)
        else:
            total += (ring - 1) * h * piece * head_dim * elem + (ring - 1) * h * piece * (head_dim + 1) * 4
        for r in range(ring):
            shard[r] += int((lay.ring_piece(n_pad, r) < end - start).sum())
    return total
