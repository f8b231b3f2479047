"""Decode with fixed shapes, so that a step can be captured once as a CUDA graph and replayed.

Eager decode attends to a cache that grows by one position a step: new shapes every step.
Here each layer's cache gets room for the whole generation up front (exactly: its keys, the new
tokens, and one slot that a ring rank not taking the token writes to and never reads); each
layer writes its new K/V at an index held in a device tensor and attends to its keys up to a
device-held length (toolkit.attention.cache_decode: flash-attn's KV-cache kernel where it runs,
else the keys [0, span) in blocks, masked per row). So every step runs the same kernels on the
same buffers, with no host sync inside the layers; what changes between steps (token, position,
write index, length) is written into those buffers before the step. The host keeps the lengths,
as in eager decode. `span` bounds what the fallback reads: it follows the longest shard (the
same on every rank, so all ranks capture at the same steps) and grows by an eighth at a time.

Soft-capping is the kernel's own argument. A sliding window that starts to apply stops the step
(decode such a model eagerly, where a window is a slice of the keys found by position): ring
shards hold zigzag pieces, so there a window is not a range of storage indices.

On CPU the same step runs eagerly (the tests hold it to eager decode's tokens); on a CUDA
device `CudaGraphStep` captures it per generation and replays it per token.
"""
from __future__ import annotations

import contextlib

import torch

from ..attention.cache_decode import cache_attention, flash_cache_kernel
from ..distributed.comm import CommCounter
from .hf import STATE_KWARG, rope_for_length
from .sequence_parallel import SequenceParallelAttention

SPAN_SLACK = 256  # keys the fallback reads past the longest shard, at least (an eighth of it when longer)


class StaticDecodeAttention:
    """The `lctk_state` of a fixed-shape decode step over a prefilled SequenceParallelAttention."""

    def __init__(self, base: SequenceParallelAttention, room: int):
        """room: tokens this generation may add."""
        self.base, self.topo, self.comm = base, base.topo, base.comm
        cache = base.cache
        if not cache.layers:
            raise ValueError("static decode needs a prefilled cache")
        if cache.kind is not None:
            raise ValueError(f"the static-shape decode step reads a cache in the model's dtype, not a {cache.kind} one")
        if any(kv.first for kv in cache.layers.values()):
            raise ValueError("the static-shape decode step (the CUDA graph's) does not do sliding-window attention, "
                             "and this prompt is past the model's window: decode this model eagerly")
        for kv in cache.layers.values():
            kv.reserve(kv.length + room + 1)  # exact: nothing grows (and no buffer moves) while a graph replays
            # keys past a length still enter the fallback's PV product (times 0): uninitialised memory could be nan
            kv.k[:, :, kv.length :].zero_()
            kv.v[:, :, kv.length :].zero_()
        self.limit = min(kv.capacity for kv in cache.layers.values())  # indices this rank can write
        self.kernel = flash_cache_kernel(next(iter(cache.layers.values())).k)  # None: the blockwise fallback
        device = self.topo.device
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)   # shard index of this rank's new K/V
        self.visible = torch.zeros(1, dtype=torch.int32, device=device)   # keys of this rank's shard after it
        self.owner: int | None = None
        self.position = 0
        self.bucket = 0  # keys (shard index) the fallback reads: grows by SPAN_SLACK or an eighth, same on all ranks
        self.window: int | None = None  # smallest sliding window seen: checked each step (replays skip attend)

    @property
    def span(self) -> int:
        return min(self.limit, self.bucket)

    def shape_key(self):
        """What a captured graph's shapes depend on (None: nothing changes between steps)."""
        return None if self.kernel is not None else self.bucket

    def begin_decode(self, position: int):
        """Host side: who takes the token (the shortest ring shard, as in eager decode); fill the buffers."""
        self.position = position
        if self.window is not None and self.window <= position:
            raise ValueError(f"the static-shape decode step (the CUDA graph's) reached position {position}, past this "
                             f"model's sliding window of {self.window}: decode this model eagerly")
        lengths = self.base.cache.shard_lengths
        self.owner = lengths.index(min(lengths))
        mine = lengths[self.base.r_rank]
        if mine + 1 > self.limit:
            raise RuntimeError(f"static decode ran past its reserved room ({self.limit} positions on this rank)")
        owns = self.owner == self.base.r_rank
        self.write_at.fill_(mine)  # a rank not taking the token writes past its keys and never reads it
        self.visible.fill_(mine + 1 if owns else mine)
        longest = max(lengths) + 1
        if longest > self.bucket:
            self.bucket = longest + max(SPAN_SLACK, longest // 8)

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
            if window <= self.position:
                raise ValueError("the static-shape decode step (the CUDA graph's) does not do sliding-window "
                                 "attention: decode this model eagerly")
        q_l, k_l, v_l = self.base.decode_heads(q, k, v)  # [B, H/U, 1, d], [B, G'/U, 1, d] x2
        kv = self.base.cache.layer(layer)  # nothing evicted (checked at the start): storage index = shard index
        lengths = self.visible if q.shape[0] == 1 else self.visible.expand(q.shape[0]).contiguous()  # [B] int32
        kv.k.index_copy_(2, self.write_at, k_l)  # [B, g, capacity, d] at index write_at
        kv.v.index_copy_(2, self.write_at, v_l)
        out, lse = cache_attention(q_l, kv.k, kv.v, lengths, scale, self.span, softcap=softcap,
                                   kernel=self.kernel)  # a window not reached yet: every key is in it
        return self.base.finish_decode(out, lse, q.dtype, layer).transpose(1, 2)  # [B, 1, H, d]


class _Recording(CommCounter):
    """A counter that also keeps every add(), so that the pass it saw can be counted again."""

    def __init__(self):
        super().__init__()
        self.events: list = []

    def add(self, *args, **kwargs):
        self.events.append((args, kwargs))
        super().add(*args, **kwargs)


class PassTraffic:
    """The traffic of one captured pass: while a graph is captured no byte moves, so the capture
    counts nothing on the topology's counter; every replay adds what that pass counted."""

    def __init__(self, comm):
        self.comm = comm
        self.events: list = []

    @contextlib.contextmanager
    def recording(self):
        counter, self.comm.counter = self.comm.counter, _Recording()
        try:
            yield
        finally:
            self.events, self.comm.counter = self.comm.counter.events, counter

    def replayed(self):
        for args, kwargs in self.events:
            self.comm.counter.add(*args, **kwargs)


class CudaGraphStep:
    """One decode step captured as a CUDA graph on first use, replayed for every later token (captured
    again only when the fallback's span grows, at the same step on every rank)."""

    def __init__(self, model, state: StaticDecodeAttention):
        if state.topo.device.type != "cuda":
            raise ValueError("a CUDA graph needs a CUDA device; on CPU decode runs eagerly")
        self.model, self.state = model, state
        device = state.topo.device
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)        # [1, 1] the token
        self.positions = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1] its position
        self.graph = None
        self.captured_for = None
        self.logits = None
        self.traffic = PassTraffic(state.comm)

    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, position_ids=self.positions, use_cache=False, logits_to_keep=1,
                         **{STATE_KWARG: self.state})
        return out.logits

    def _capture(self):
        self.graph = self.logits = None  # the last graph (and its memory pool) goes before the next is taken
        # Warm-up on a side stream (allocator pools, kernel choice); each run writes the same
        # K/V into the same slot, so running the step more than once changes nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with self.traffic.recording(), torch.cuda.graph(graph):
            self.logits = self._forward()
        self.graph, self.captured_for = graph, self.state.shape_key()

    @torch.no_grad()
    def __call__(self, token: int, position: int) -> torch.Tensor:
        """-> logits [V] fp32 of the token at `position`."""
        self.state.begin_decode(position)
        rope_for_length(self.model, position + 1)
        self.ids.fill_(token)
        self.positions.fill_(position)
        if self.graph is None or self.captured_for != self.state.shape_key():
            self._capture()
        self.graph.replay()
        self.traffic.replayed()
        self.state.end_step()
        return self.logits[0, -1].float()
