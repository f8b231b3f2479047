"""The KV cache of one request: per layer, this rank's shard (heads or positions).

Head-sharded (Ulysses): every rank keeps all positions of its heads. Sequence-sharded
(ring): every rank keeps some positions of its heads; the lengths of all ring shards are
tracked on every rank, so a receiver knows what it is about to receive and decode knows
which shard is shortest. Buffers are reserved up front so appends never copy the cache.
"""
from __future__ import annotations

import torch


class LayerKV:
    def __init__(self):
        self.k = self.v = None
        self.length = 0

    def _grow(self, like: torch.Tensor, needed: int, reserve: int):
        capacity = max(needed, reserve, 2 * (0 if self.k is None else self.k.shape[2]))
        shape = (like.shape[0], like.shape[1], capacity, like.shape[3])  # [B, g, capacity, d]
        k = torch.empty(shape, dtype=like.dtype, device=like.device)
        v = torch.empty(shape, dtype=like.dtype, device=like.device)
        if self.k is not None:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def reserve(self, capacity: int):
        """Room for `capacity` positions without another copy (a no-op if there is room)."""
        if self.k is None:
            raise ValueError("this layer's cache is empty: prefill before reserving room to decode into")
        if capacity > self.capacity:
            self._grow(self.k, capacity, capacity)

    def append(self, k: torch.Tensor, v: torch.Tensor, reserve: int = 0):
        """k/v [B, g, S, d] go after what is there."""
        needed = self.length + k.shape[2]
        if self.k is None or needed > self.k.shape[2]:
            self._grow(k, needed, reserve)
        self.k[:, :, self.length : needed] = k
        self.v[:, :, self.length : needed] = v
        self.length = needed

    def view(self, like: torch.Tensor | None = None):
        """(k, v) [B, g, L, d] views of what is stored (empty tensors shaped like `like` if nothing)."""
        if self.k is None:
            empty = like.new_empty((like.shape[0], like.shape[1], 0, like.shape[3]))
            return empty, empty
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class ShardedKVCache:
    """All layers of one rank, plus the length of every ring shard (same on all ranks)."""

    def __init__(self, ring: int = 1, reserve_tokens: int = 0):
        self.layers: dict[int, LayerKV] = {}
        self.shard_lengths = [0] * ring
        self.reserve_tokens = reserve_tokens

    def layer(self, idx: int) -> LayerKV:
        return self.layers.setdefault(idx, LayerKV())

    def append(self, idx: int, k: torch.Tensor, v: torch.Tensor):
        self.layer(idx).append(k, v, self.reserve_tokens)

    def mark(self) -> tuple[list[int], dict[int, int]]:
        """What is stored now; rollback(mark) forgets everything appended after it, copying nothing."""
        return list(self.shard_lengths), {i: kv.length for i, kv in self.layers.items()}

    def rollback(self, mark) -> None:
        shard_lengths, lengths = mark
        self.shard_lengths = list(shard_lengths)
        for i, kv in self.layers.items():
            kv.length = lengths.get(i, 0)

    def since(self, mark) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], list[int]]:
        """What was appended after `mark`, copied out: ({layer: (k, v) [B, g, n, d]}, tokens added per ring shard)."""
        shard_lengths, lengths = mark
        added = {}
        for i, kv in self.layers.items():
            k, v = kv.view()
            start = lengths.get(i, 0)
            added[i] = (k[:, :, start:].clone(), v[:, :, start:].clone())
        return added, [now - then for now, then in zip(self.shard_lengths, shard_lengths)]

    @property
    def total_tokens(self) -> int:
        return sum(self.shard_lengths)

    def nbytes(self) -> int:
        return sum(2 * kv.k.numel() * kv.k.element_size() for kv in self.layers.values() if kv.k is not None)
