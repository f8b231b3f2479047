"""Per-request attention state: where we are (a prefill chunk or a decode step), the cache,
and the dispatch Ulysses -> (local | ring) -> cache -> Ulysses back.

One instance travels through `model(..., lctk_state=state)` to the attention function
registered in toolkit.engine.hf; the HF model itself is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.kernels import attention_with_lse, decode_attention, merge_partials
from ..attention.layout import SequenceLayout
from ..attention.ring import choose_ring_mode, ring_merge, ring_pass_kv, ring_pass_q
from ..attention.ulysses import gather_heads, heads_to_seq, local_heads, replicate_kv_heads, seq_to_heads_packed
from ..distributed.topology import Topology
from .cache import ShardedKVCache


@dataclass
class ChunkInfo:
    start: int            # global position of the chunk's first token
    length: int           # real tokens in the chunk
    local_index: torch.Tensor  # chunk-relative indices held by this rank (>= length: padding)
    piece_real: int       # real tokens in this ring rank's whole piece (a prefix of it)
    piece_real_all: list  # the same for every ring rank
    ring_mode: str        # pass-kv | pass-q (ring > 1 only)


class SequenceParallelAttention:
    def __init__(self, topo: Topology, sequence_layout: str = "zigzag", ring_mode: str = "auto",
                 num_heads: int = 1, num_kv_heads: int = 1, reserve_tokens: int = 0):
        dims = topo.dims
        self.topo, self.comm = topo, topo.comm
        self.ulysses, self.ring = dims.ulysses, dims.ring
        self.u_group, self.r_group = topo.group("ulysses"), topo.group("ring")
        self.u_rank, self.r_rank = topo.coords["ulysses"], topo.coords["ring"]
        self.layout = SequenceLayout(sequence_layout, dims.ring, dims.ulysses)
        self.ring_mode = ring_mode
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.cache = ShardedKVCache(dims.ring, reserve_tokens)
        self.chunk: ChunkInfo | None = None
        self.decode_owner: int | None = None

    # ---- phases -------------------------------------------------------------------------
    def begin_chunk(self, start: int, length: int) -> ChunkInfo:
        n_pad = self.layout.padded_length(length)
        real = [int((self.layout.ring_piece(n_pad, r) < length).sum()) for r in range(self.ring)]
        mode = choose_ring_mode(self.ring_mode, length, self.cache.total_tokens, self.num_heads, self.num_kv_heads)
        self.chunk = ChunkInfo(start, length, self.layout.local_indices(length, self.r_rank, self.u_rank),
                               real[self.r_rank], real, mode)
        self.decode_owner = None
        return self.chunk

    def begin_decode(self):
        lengths = self.cache.shard_lengths
        self.decode_owner = lengths.index(min(lengths))  # shortest shard takes the new token
        self.chunk = None

    def end_step(self):
        """Record what this forward pass added to every shard (once per pass, not per layer)."""
        if self.chunk is not None:
            for r, n in enumerate(self.chunk.piece_real_all):
                self.cache.shard_lengths[r] += n
        elif self.decode_owner is not None:
            self.cache.shard_lengths[self.decode_owner] += 1

    # ---- attention ----------------------------------------------------------------------
    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        """q [B, H, S_loc, d], k/v [B, G, S_loc, d] (this rank's tokens, its TP heads)
        -> out [B, S_loc, H, d], as transformers' attention functions return it."""
        if self.chunk is not None:
            k, v = replicate_kv_heads(k, self.ulysses), replicate_kv_heads(v, self.ulysses)
            out = self._prefill(layer, q, k, v, scale)
        elif self.decode_owner is not None:
            out = self._decode(layer, q, k, v, scale)
        else:
            raise RuntimeError("attention called outside a prefill chunk or decode step")
        return out.transpose(1, 2)

    def _prefill(self, layer, q, k, v, scale):
        c = self.chunk
        # [B, H/U, S_piece, d], [B, G'/U, S_piece, d] x2: one all-to-all for the three
        q_h, k_h, v_h = seq_to_heads_packed([q, k, v], self.u_group, self.comm, layer)
        kv = self.cache.layer(layer)
        k_c, v_c = kv.view(k_h)
        if self.ring == 1:
            out, lse = attention_with_lse(q_h, k_h, v_h, causal=True, scale=scale)
            if k_c.shape[2]:
                o_c, l_c = attention_with_lse(q_h, k_c, v_c, causal=False, scale=scale)
                out, _ = merge_partials(o_c, l_c, out, lse)
        elif c.ring_mode == "pass-kv":
            out, _ = ring_pass_kv(q_h, k_h, v_h, k_c, v_c, list(self.cache.shard_lengths),
                                  self.layout.zigzag, scale, self.r_group, self.comm, layer)
        else:
            out, _ = ring_pass_q(q_h, k_h, v_h, k_c, v_c, self.layout.zigzag, scale,
                                 self.r_group, self.comm, layer)
        # padding is a suffix of every piece: drop it before it enters the cache
        self.cache.append(layer, k_h[:, :, : c.piece_real], v_h[:, :, : c.piece_real])
        return heads_to_seq(out.to(q.dtype), self.u_group, self.comm, layer)  # [B, H, S_loc, d]

    def _decode(self, layer, q, k, v, scale):
        q_l, k_l, v_l = self.decode_heads(q, k, v)
        if self.r_rank == self.decode_owner:
            self.cache.append(layer, k_l, v_l)
        k_c, v_c = self.cache.layer(layer).view(k_l)
        out, lse = decode_attention(q_l, k_c, v_c, scale)
        return self.finish_decode(out, lse, q.dtype, layer)

    # ---- what every decode path shares (eager, static, batched rows) -----------------------
    def decode_heads(self, q, k, v):
        """One token's q [B, H, 1, d], k/v [B, G, 1, d] (this rank's TP heads) -> the heads this
        rank attends with: q [B, H/U, 1, d], k/v [B, G'/U, 1, d] (KV heads replicated first when
        there are fewer than Ulysses ranks)."""
        k, v = replicate_kv_heads(k, self.ulysses), replicate_kv_heads(v, self.ulysses)
        return (local_heads(q, self.ulysses, self.u_rank), local_heads(k, self.ulysses, self.u_rank),
                local_heads(v, self.ulysses, self.u_rank))

    def finish_decode(self, out, lse, dtype, layer) -> torch.Tensor:
        """This rank's partial over its keys -> every head's output [B, H, 1, d]: merged over the
        ring (one all-gather), gathered over the Ulysses heads."""
        if self.ring > 1:
            out, lse = ring_merge(out, lse, self.r_group, self.comm, layer)
        return gather_heads(out.to(dtype), self.u_group, self.comm, layer)  # [B, H, 1, d]
