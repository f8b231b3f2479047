"""Per-request attention state: where we are (a prefill chunk or a decode step), the cache,
and the dispatch Ulysses -> (local | ring) -> cache -> Ulysses back.

One instance travels through `model(..., lctk_state=state)` to the attention function
registered in toolkit.engine.hf; the HF model itself is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.kernels import attention_with_lse, decode_attention, merge_many, merge_partials
from ..attention.kv_quant import attend_stored, round_trip
from ..attention.layout import SequenceLayout
from ..attention.ring import choose_ring_mode, ring_merge, ring_pass_kv, ring_pass_q
from ..attention.ulysses import gather_heads, heads_to_seq, local_heads, replicate_kv_heads, seq_to_heads_packed
from ..attention.window import positional_attention
from ..distributed.topology import Topology
from .cache import ShardedKVCache


@dataclass(frozen=True)
class Masking:
    """A layer's sliding window and logit soft-capping (None: none); active when either is set."""

    window: int | None = None
    softcap: float | None = None

    @property
    def active(self) -> bool:
        return self.window is not None or self.softcap is not None

    def attend(self, q, k, v, q_pos, k_pos, scale):
        return positional_attention(q, k, v, q_pos, k_pos, scale, self.window, self.softcap)

    def attend_stored(self, q, stored, q_pos, k_pos, scale):
        """The same against a cache as stored (quantised: a block of keys, and of positions, at a time)."""
        return attend_stored(q, stored, lambda q_, k, v, a: self.attend(q_, k, v, q_pos, k_pos[a : a + k.shape[2]],
                                                                        scale))


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
                 num_heads: int = 1, num_kv_heads: int = 1, reserve_tokens: int = 0, kv_kind: str | None = None):
        dims = topo.dims
        self.topo, self.comm = topo, topo.comm
        self.ulysses, self.ring = dims.ulysses, dims.ring
        self.u_group, self.r_group = topo.group("ulysses"), topo.group("ring")
        self.u_rank, self.r_rank = topo.coords["ulysses"], topo.coords["ring"]
        self.layout = SequenceLayout(sequence_layout, dims.ring, dims.ulysses)
        self.ring_mode = ring_mode
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.cache = ShardedKVCache(dims.ring, reserve_tokens, kv_kind)
        self.chunk: ChunkInfo | None = None
        self.decode_owner: int | None = None
        self.decode_owners: list[int] = []  # ring shard of each token of the decode step
        self.decode_position = 0

    # ---- phases -------------------------------------------------------------------------
    def begin_chunk(self, start: int, length: int) -> ChunkInfo:
        n_pad = self.layout.padded_length(length)
        real = [int((self.layout.ring_piece(n_pad, r) < length).sum()) for r in range(self.ring)]
        mode = choose_ring_mode(self.ring_mode, length, self.cache.total_tokens, self.num_heads, self.num_kv_heads)
        self.chunk = ChunkInfo(start, length, self.layout.local_indices(length, self.r_rank, self.u_rank),
                               real[self.r_rank], real, mode)
        self.decode_owner = None
        return self.chunk

    def begin_decode(self, position: int, count: int = 1):
        """A decode step of `count` tokens at positions position.. (a token and the guesses after
        it): each new key goes to the shard that is shortest as it comes, so the keys lie where
        plain decode, a token a step, would have put them."""
        lengths = list(self.cache.shard_lengths)
        self.decode_owners = []
        for _ in range(count):
            owner = lengths.index(min(lengths))
            self.decode_owners.append(owner)
            lengths[owner] += 1
        self.decode_owner = self.decode_owners[0]
        self.decode_position = position
        self.chunk = None

    def drop_newest(self, count: int) -> None:
        """Forget the keys of the last `count` tokens of the decode step just run (guesses that
        were wrong), on every shard; the rest of the cache is untouched, nothing is copied."""
        if count <= 0:
            return
        gone = self.decode_owners[len(self.decode_owners) - count :]
        for r in set(gone):
            self.cache.shard_lengths[r] -= gone.count(r)
        mine = gone.count(self.r_rank)
        if mine:
            for kv in self.cache.layers.values():
                kv.length -= mine
        self.decode_owners = self.decode_owners[: len(self.decode_owners) - count]

    def piece_positions(self, ring_rank: int) -> torch.Tensor:
        """Global positions of ring rank r's piece of the current chunk, padding included (host)."""
        c = self.chunk
        return c.start + self.layout.ring_piece(self.layout.padded_length(c.length), ring_rank)

    def end_step(self):
        """Record what this forward pass added to every shard (once per pass, not per layer)."""
        cache = self.cache
        if self.chunk is not None:
            for r, n in enumerate(self.chunk.piece_real_all):
                cache.add_positions(r, self.piece_positions(r)[:n])
                cache.shard_lengths[r] += n
        elif self.decode_owner is not None:
            for r in sorted(set(self.decode_owners)):
                cache.add_positions(r, self._new_positions(r))
                cache.shard_lengths[r] += self.decode_owners.count(r)

    def _new_positions(self, shard: int) -> torch.Tensor:
        """Positions of the decode step's tokens whose keys shard r stores (host)."""
        return torch.tensor([self.decode_position + i for i, r in enumerate(self.decode_owners) if r == shard],
                            dtype=torch.long)

    # ---- attention ----------------------------------------------------------------------
    def attend(self, layer: int, q, k, v, scale: float, window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
        """q [B, H, S_loc, d], k/v [B, G, S_loc, d] (this rank's tokens, its TP heads)
        -> out [B, S_loc, H, d], as transformers' attention functions return it. window: the
        layer's sliding window (keys within `window` positions of the query, its own included),
        softcap: its attention logit soft-capping; either makes attention go by positions."""
        if self.chunk is None:
            if self.decode_owner is None:
                raise RuntimeError("attention called outside a prefill chunk or decode step")
            q_l, k_l, v_l = self.decode_heads(q, k, v)
            out, lse = self.decode_partial(layer, q_l, k_l, v_l, scale, window, softcap)
            return self.finish_decode(out, lse, q.dtype, layer).transpose(1, 2)
        masking = self._masking(layer, self.chunk.start + self.chunk.length - 1, self.chunk.start, window, softcap)
        k, v = replicate_kv_heads(k, self.ulysses), replicate_kv_heads(v, self.ulysses)
        return self._prefill(layer, q, k, v, scale, masking).transpose(1, 2)

    def _masking(self, layer: int, last: int, first: int, window, softcap) -> "Masking":
        """The layer's masking for queries at positions first..last; a window's keys no query from
        here on can see leave every shard."""
        masking = Masking(window if window is not None and window <= last else None, softcap)
        if masking.window is not None:
            self.cache.evict(layer, first - masking.window, self.r_rank)
        return masking

    def _prefill(self, layer, q, k, v, scale, masking):
        c = self.chunk
        # [B, H/U, S_piece, d], [B, G'/U, S_piece, d] x2: one all-to-all for the three
        q_h, k_h, v_h = seq_to_heads_packed([q, k, v], self.u_group, self.comm, layer)
        # a quantised cache: the chunk's own keys are attended as they will be stored, so where a
        # prompt's chunks begin and end (alone, or beside other requests) does not change its answer
        k_h, v_h = round_trip(k_h, self.cache.kind), round_trip(v_h, self.cache.kind)
        cached = self.cache.stored(layer, k_h)  # as stored: quantised caches are read a block at a time
        if masking.active:
            parts = self._positional_partials(layer, scale, masking)
            if self.ring == 1:
                out, _ = merge_many(parts(q_h, cached, k_h, v_h, 0, 0))
            elif c.ring_mode == "pass-kv":
                out, _ = ring_pass_kv(q_h, k_h, v_h, cached, self.cache.live_lengths(layer), self.layout.zigzag,
                                      scale, self.r_group, self.comm, layer, partials=parts)
            else:
                out, _ = ring_pass_q(q_h, k_h, v_h, cached, self.layout.zigzag, scale, self.r_group, self.comm,
                                     layer, partials=parts)
        elif self.ring == 1:
            out, lse = attention_with_lse(q_h, k_h, v_h, causal=True, scale=scale)
            if cached.length:
                o_c, l_c = attend_stored(q_h, cached, lambda q_, k_, v_, _a: attention_with_lse(q_, k_, v_, False, scale))
                out, _ = merge_partials(o_c, l_c, out, lse)
        elif c.ring_mode == "pass-kv":
            out, _ = ring_pass_kv(q_h, k_h, v_h, cached, list(self.cache.shard_lengths),
                                  self.layout.zigzag, scale, self.r_group, self.comm, layer)
        else:
            out, _ = ring_pass_q(q_h, k_h, v_h, cached, self.layout.zigzag, scale,
                                 self.r_group, self.comm, layer)
        # padding is a suffix of every piece: drop it before it enters the cache; a window's
        # layer needs room for the window and a chunk, not for the prompt
        reserve = None if masking.window is None else min(self.cache.reserve_tokens, 2 * (masking.window + k_h.shape[2]))
        self.cache.append(layer, k_h[:, :, : c.piece_real], v_h[:, :, : c.piece_real], reserve)
        return heads_to_seq(out.to(q.dtype), self.u_group, self.comm, layer)  # [B, H, S_loc, d]

    def _positional_partials(self, layer: int, scale: float, masking: "Masking"):
        """The ring's partials decided by positions: this chunk's pieces and every cache shard."""
        cache = self.cache

        def parts(q, cached, k_piece, v_piece, q_owner, k_owner):
            q_pos, k_pos = self.piece_positions(q_owner), cache.live_positions(layer, k_owner)
            return [masking.attend_stored(q, cached, q_pos, k_pos, scale),
                    masking.attend(q, k_piece, v_piece, q_pos, self.piece_positions(k_owner), scale)]

        return parts

    def decode_partial(self, layer, q_l, k_l, v_l, scale, window=None, softcap=None, own_only: bool = False):
        """This rank's heads of a decode step's S tokens (decode_heads; S > 1: a token and its
        guesses) -> (out, lse) over this rank's keys: each new key joins the cache of the ring rank
        that owns it first. own_only: a shared prefix's keys are left out (the caller reads them
        once for every row that shares them)."""
        S, first = q_l.shape[2], self.decode_position
        masking = self._masking(layer, first + S - 1, first, window, softcap)
        mine = [i for i, r in enumerate(self.decode_owners) if r == self.r_rank]
        stored = (lambda: self.cache.layer(layer).stored(k_l)) if own_only else (lambda: self.cache.stored(layer, k_l))
        before = stored() if S > 1 and not masking.active else None  # keys every new query sees whole
        if mine:
            pick = torch.tensor(mine, device=k_l.device)
            k_new, v_new = (k_l, v_l) if S == 1 else (k_l[:, :, pick], v_l[:, :, pick])  # [B, g, n, d]
            self.cache.append(layer, k_new, v_new)
        if before is None and not masking.active:  # one token: it sees every key, its own among them
            return attend_stored(q_l, stored(), lambda q_, k_, v_, _a: decode_attention(q_, k_, v_, scale))
        q_pos = torch.arange(first, first + S)
        if masking.active:  # the keys' positions: the shard's, then the new tokens' it took
            k_pos = torch.cat([self.cache.live_positions(layer, self.r_rank), self._new_positions(self.r_rank)])
            return masking.attend_stored(q_l, stored(), q_pos, k_pos, scale)
        out, lse = attend_stored(q_l, before, lambda q_, k_, v_, _a: decode_attention(q_, k_, v_, scale))
        if mine:  # the step's own keys, as the cache gives them back, seen causally
            kind = self.cache.kind
            o_n, l_n = positional_attention(q_l, round_trip(k_new, kind), round_trip(v_new, kind), q_pos,
                                            self._new_positions(self.r_rank), scale)
            out, lse = merge_partials(out, lse, o_n, l_n)
        return out, lse

    def plain_decode_keys(self, layer: int, k_l, v_l):
        """A one-token decode step over keys needing no positions (the caller's layer has no window
        or soft-cap): its key joins the cache where this rank owns it -> (k, v) [1, g, L, d], views
        of every key this rank holds for it; None where decode_partial must attend (a quantised
        cache, a prefix read by reference, guesses, an empty shard)."""
        cache = self.cache
        if cache.kind is not None or getattr(cache, "prefix", None) is not None or len(self.decode_owners) != 1:
            return None
        if self.decode_owner == self.r_rank:
            cache.append(layer, k_l, v_l)
        k, v = cache.layer(layer).view(k_l)
        return (k, v) if k.shape[2] else None

    # ---- what every decode path shares (eager, static, batched rows) -----------------------
    def decode_heads(self, q, k, v):
        """A decode step's q [B, H, S, d], k/v [B, G, S, d] (this rank's TP heads) -> the heads this
        rank attends with: q [B, H/U, S, d], k/v [B, G'/U, S, d] (KV heads replicated first when
        there are fewer than Ulysses ranks)."""
        k, v = replicate_kv_heads(k, self.ulysses), replicate_kv_heads(v, self.ulysses)
        return (local_heads(q, self.ulysses, self.u_rank), local_heads(k, self.ulysses, self.u_rank),
                local_heads(v, self.ulysses, self.u_rank))

    def finish_decode(self, out, lse, dtype, layer) -> torch.Tensor:
        """This rank's partial over its keys -> every head's output [B, H, S, d]: merged over the
        ring (one all-gather), gathered over the Ulysses heads."""
        if self.ring > 1:
            out, lse = ring_merge(out, lse, self.r_group, self.comm, layer)
        return gather_heads(out.to(dtype), self.u_group, self.comm, layer)  # [B, H, S, d]
