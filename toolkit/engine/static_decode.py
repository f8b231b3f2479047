"""Decode with fixed shapes, so that a step can be captured once as a CUDA graph and replayed.

Eager decode attends to a cache that grows by one position a step: new shapes every step.
Here the cache's capacity is reserved up front, plus one scratch slot; each layer writes its
new K/V at a position held in a device tensor (the scratch slot on ring ranks that do not
own the token) and attends to the whole capacity with the keys past a device-held length
masked. So every step runs the same kernels on the same buffers, with no host sync inside
the layers; what changes between steps (token, position, write slot, length) is written
into those buffers before the step. The host keeps the lengths, as in eager decode.

On CPU the same step runs eagerly (the tests hold it to eager decode's tokens); on a CUDA
device `CudaGraphStep` captures it once per generation and replays it per token.
"""
from __future__ import annotations

import torch

from ..attention.kernels import decode_attention
from .hf import STATE_KWARG, rope_for_length
from .sequence_parallel import SequenceParallelAttention


class StaticDecodeAttention:
    """The `lctk_state` of a fixed-shape decode step over a prefilled SequenceParallelAttention."""

    def __init__(self, base: SequenceParallelAttention, room: int):
        """room: tokens this generation may add (the cache gets that many free positions plus a scratch slot)."""
        self.base, self.topo, self.comm = base, base.topo, base.comm
        cache = base.cache
        if not cache.layers:
            raise ValueError("static decode needs a prefilled cache")
        if cache.kind is not None:
            raise ValueError(f"the static-shape decode step reads a cache in the model's dtype, not a {cache.kind} one")
        need = max(cache.shard_lengths[base.r_rank] + room + 1, *(kv.capacity for kv in cache.layers.values()))
        for kv in cache.layers.values():
            kv.reserve(need)
            # masked keys still enter the PV product (times 0): uninitialised memory there could be inf or nan
            kv.k[:, :, kv.length :].zero_()
            kv.v[:, :, kv.length :].zero_()
        self.scratch = min(kv.capacity for kv in cache.layers.values()) - 1  # never a real key
        device = self.topo.device
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)  # where this rank writes the new K/V
        self.visible = torch.zeros(1, dtype=torch.long, device=device)   # keys of this rank's shard after it
        self.owner: int | None = None
        self.window: int | None = None  # smallest sliding window seen: checked each step (replays skip attend)

    def begin_decode(self, position: int):
        """Host side: who takes the token (the shortest ring shard, as in eager decode); fill the buffers."""
        self.position = position
        if self.window is not None and self.window <= position:
            raise ValueError(f"the static-shape decode step (the CUDA graph's) reached position {position}, past this "
                             f"model's sliding window of {self.window}: decode this model eagerly")
        lengths = self.base.cache.shard_lengths
        self.owner = lengths.index(min(lengths))
        mine = lengths[self.base.r_rank]
        if mine + 1 > self.scratch:
            raise RuntimeError(f"static decode ran past its reserved room ({self.scratch} positions on this rank)")
        owns = self.owner == self.base.r_rank
        self.write_at.fill_(mine if owns else self.scratch)
        self.visible.fill_(mine + 1 if owns else mine)

    def end_step(self):
        base = self.base
        base.cache.add_positions(self.owner, torch.tensor([self.position]))
        base.cache.shard_lengths[self.owner] += 1
        if self.owner == base.r_rank:
            for kv in base.cache.layers.values():
                kv.length += 1

    def attend(self, layer: int, q, k, v, scale: float, window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
        """q [B, H, 1, d], k/v [B, G, 1, d] -> out [B, 1, H, d]; fixed shapes, no host sync."""
        if window is not None:
            self.window = window if self.window is None else min(self.window, window)
        if softcap is not None or (window is not None and window <= self.position):
            raise ValueError("the static-shape decode step (the CUDA graph's) does not do sliding-window or "
                             "soft-capped attention: decode this model eagerly")
        q_l, k_l, v_l = self.base.decode_heads(q, k, v)  # [B, H/U, 1, d], [B, G'/U, 1, d] x2
        kv = self.base.cache.layer(layer)
        kv.k.index_copy_(2, self.write_at, k_l)  # [B, g, capacity, d] at position write_at
        kv.v.index_copy_(2, self.write_at, v_l)
        keys, values = kv.k[:, :, : self.scratch], kv.v[:, :, : self.scratch]  # [B, g, capacity - 1, d]
        out, lse = decode_attention(q_l, keys, values, scale, key_lengths=self.visible.expand(q.shape[0]))
        return self.base.finish_decode(out, lse, q.dtype, layer).transpose(1, 2)  # [B, 1, H, d]


class CudaGraphStep:
    """One decode step captured as a CUDA graph on first use, replayed for every later token."""

    def __init__(self, model, state: StaticDecodeAttention):
        if state.topo.device.type != "cuda":
            raise ValueError("a CUDA graph needs a CUDA device; on CPU decode runs eagerly")
        self.model, self.state = model, state
        device = state.topo.device
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)        # [1, 1] the token
        self.positions = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1] its position
        self.graph = None
        self.logits = None

    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, position_ids=self.positions, use_cache=False, logits_to_keep=1,
                         **{STATE_KWARG: self.state})
        return out.logits

    def _capture(self):
        # Warm-up on a side stream (allocator pools, kernel choice); each run writes the same
        # K/V into the same slot, so running the step more than once changes nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()

    @torch.no_grad()
    def __call__(self, token: int, position: int) -> torch.Tensor:
        """-> logits [V] fp32 of the token at `position`."""
        self.state.begin_decode(position)
        rope_for_length(self.model, position + 1)
        self.ids.fill_(token)
        self.positions.fill_(position)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        self.state.end_step()
        return self.logits[0, -1].float()
