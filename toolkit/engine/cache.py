"""The KV cache of one request: per layer, this rank's shard (heads or positions).

Head-sharded (Ulysses): every rank keeps all positions of its heads. Sequence-sharded
(ring): every rank keeps some positions of its heads; the lengths of all ring shards are
tracked on every rank, so a receiver knows what it is about to receive and decode knows
which shard is shortest. Buffers are reserved up front so appends never copy the cache.
"""
from __future__ import annotations

import torch

from ..attention.kv_quant import ChainedKV, StoredKV, quantize


class LayerKV:
    """One layer's keys and values on this rank, as stored: the model's dtype, or quantised
    (attention.kv_quant: data and a scale per token and head). Storage [start, length) is live;
    `dropped` keys of the shard were compacted away before storage index 0 (a sliding window's
    old keys). Every stored tensor ("plane") has positions on dim 2."""

    def __init__(self, kind: str | None = None):
        self.kind = kind
        self.planes: list[torch.Tensor] | None = None  # k, v (+ k_scale, v_scale when quantised)
        self.length = 0
        self.start = 0
        self.dropped = 0

    @property
    def k(self):
        return None if self.planes is None else self.planes[0]

    @property
    def v(self):
        return None if self.planes is None else self.planes[1]

    @property
    def first(self) -> int:
        """Index, among the shard's keys, of the first key still held."""
        return self.dropped + self.start

    def evict(self, keep_from: int) -> None:
        """Forget the shard's keys before index keep_from; once the dead prefix is at least half of
        what is stored, move the live keys to the front (the buffer is reused, never grown for them)."""
        self.start = max(self.start, min(keep_from - self.dropped, self.length))
        if self.start and 2 * self.start >= self.length:
            live = self.length - self.start
            for plane in self.planes:
                plane[:, :, :live] = plane[:, :, self.start : self.length].clone()
            self.dropped, self.length, self.start = self.dropped + self.start, live, 0

    def _grow(self, like: list[torch.Tensor], capacity: int):
        grown = [torch.empty((*t.shape[:2], capacity, *t.shape[3:]), dtype=t.dtype, device=t.device)
                 for t in like]  # [B, g, capacity(, d)]
        for new, old in zip(grown, self.planes or ()):
            new[:, :, : self.length] = old[:, :, : self.length]
        self.planes = grown

    @property
    def capacity(self) -> int:
        return 0 if self.planes is None else self.planes[0].shape[2]

    def reserve(self, capacity: int):
        """Room for `capacity` positions without another copy (a no-op if there is room); exactly
        that many: a reservation is never rounded up."""
        if self.planes is None:
            raise ValueError("this layer's cache is empty: prefill before reserving room to decode into")
        if capacity > self.capacity:
            self._grow(self.planes, capacity)

    def append(self, k: torch.Tensor, v: torch.Tensor, reserve: int = 0):
        """k/v [B, g, S, d] go after what is there (quantised on the way in, if the cache is)."""
        if self.kind is None:
            self.extend([k, v], reserve)
            return
        (kd, ks), (vd, vs) = quantize(k, self.kind), quantize(v, self.kind)
        self.extend([kd, vd] + ([ks, vs] if ks is not None else []), reserve)

    def extend(self, new: list[torch.Tensor], reserve: int = 0):
        """Planes as this cache stores them (k, v, and scales when quantised) go after what is there."""
        needed = self.length + new[0].shape[2]
        if self.planes is None or needed > self.capacity:  # the reservation if it holds them, else doubling
            self._grow(new, reserve if reserve >= needed else max(needed, 2 * self.capacity))
        for plane, part in zip(self.planes, new):
            plane[:, :, self.length : needed] = part
        self.length = needed

    def stored(self, like: torch.Tensor | None = None) -> StoredKV:
        """The live keys and values as stored (views, no copy); empty ones shaped like `like`."""
        if self.planes is None:
            empty = like.new_empty((like.shape[0], like.shape[1], 0, like.shape[3]))
            return StoredKV(empty, empty)
        live = [plane[:, :, self.start : self.length] for plane in self.planes]
        return StoredKV(live[0], live[1], self.kind, *live[2:])

    def view(self, like: torch.Tensor | None = None):
        """(k, v) [B, g, L, d] views of the live keys of a cache in the model's dtype."""
        if self.kind is not None:
            raise TypeError(f"a {self.kind} cache is read through stored(): its keys are quantised")
        stored = self.stored(like)
        return stored.k, stored.v


class ShardedKVCache:
    """All layers of one rank, plus the length of every ring shard and the global position of
    every key each shard holds, in cache order (the same on all ranks: attention by position,
    sliding windows, saving a cache, truncating one, all read them here)."""

    def __init__(self, ring: int = 1, reserve_tokens: int = 0, kind: str | None = None):
        self.kind = kind  # None: the model's dtype; int8 / int4 / fp8 / bf16 / fp16 as stored
        self.layers: dict[int, LayerKV] = {}
        self.shard_lengths = [0] * ring
        self.reserve_tokens = reserve_tokens
        self._positions = [torch.zeros(0, dtype=torch.long) for _ in range(ring)]  # host int64, grown in place
        self.evicted: dict[int, int] = {}  # layer -> keys at positions <= this are gone from every shard
        self.pinned = False  # a document session or a prefix cache keeps every key: nothing is evicted

    def evict(self, layer: int, upto: int, shard: int) -> None:
        """A sliding-window layer forgets the keys at positions <= upto in every shard (no later
        query sees them); this rank's storage, holding `shard`, drops them. Same on every rank."""
        if self.pinned or upto <= self.evicted.get(layer, -1):
            return
        self.evicted[layer] = upto
        self.layer(layer).evict(self.live_from(layer, shard))

    def live_from(self, layer: int, shard: int) -> int:
        """Index of shard r's first key that `layer` still holds."""
        upto = self.evicted.get(layer)
        if upto is None:
            return 0
        return int(torch.searchsorted(self.shard_positions(shard), upto, right=True))

    def live_positions(self, layer: int, shard: int) -> torch.Tensor:
        """Positions of the keys `layer` holds in shard r (host, ascending)."""
        return self.shard_positions(shard)[self.live_from(layer, shard) :]

    def live_lengths(self, layer: int) -> list[int]:
        """Keys `layer` holds in every shard (what a ring hop of its cache carries)."""
        return [n - self.live_from(layer, r) for r, n in enumerate(self.shard_lengths)]

    def shard_positions(self, shard: int) -> torch.Tensor:
        """Global positions [L_r] of ring shard r's keys, in cache order (ascending)."""
        return self._positions[shard][: self._own(shard)]

    def _own(self, shard: int) -> int:
        """Keys of shard r this cache stored itself (all of them; a shared prefix's are not)."""
        return self.shard_lengths[shard]

    def stored(self, idx: int, like: torch.Tensor | None = None):
        """Layer idx's live keys and values on this rank, as stored (views, no copy)."""
        return self.layer(idx).stored(like)

    def add_positions(self, shard: int, positions: torch.Tensor) -> None:
        """Record positions appended to shard r (call before its length grows by as many)."""
        at, n = self._own(shard), positions.numel()
        held = self._positions[shard]
        if at + n > held.numel():
            grown = torch.empty(max(at + n, 2 * held.numel()), dtype=torch.long)
            grown[:at] = held[:at]
            self._positions[shard] = held = grown
        held[at : at + n] = positions

    def set_positions(self, positions: list[torch.Tensor]) -> None:
        """Every shard's positions at once (a loaded or truncated cache); lengths follow."""
        self._positions = [p.clone() for p in positions]
        self.shard_lengths = [p.numel() for p in positions]

    def layer(self, idx: int) -> LayerKV:
        if idx not in self.layers:
            self.layers[idx] = LayerKV(self.kind)
        return self.layers[idx]

    def append(self, idx: int, k: torch.Tensor, v: torch.Tensor, reserve: int | None = None):
        self.layer(idx).append(k, v, self.reserve_tokens if reserve is None else reserve)

    def mark(self) -> tuple[list[int], dict[int, int]]:
        """What is stored now; rollback(mark) forgets everything appended after it, copying nothing.
        A cache that will be rolled back keeps every key from now on (pinned)."""
        self.pinned = True
        return list(self.shard_lengths), {i: kv.length for i, kv in self.layers.items()}

    def rollback(self, mark) -> None:
        shard_lengths, lengths = mark
        self.shard_lengths = list(shard_lengths)
        for i, kv in self.layers.items():
            kv.length = lengths.get(i, 0)

    @property
    def total_tokens(self) -> int:
        return sum(self.shard_lengths)

    def held_tokens(self) -> dict[int, int]:
        """Keys each layer holds on this rank (live ones)."""
        return {i: kv.length - kv.start for i, kv in self.layers.items()}

    def nbytes(self) -> int:
        """Bytes of every layer's buffers (reserved room included)."""
        return sum(p.numel() * p.element_size() for kv in self.layers.values() for p in (kv.planes or ()))


class SharedPrefix:
    """A prefilled cache frozen to be shared by reference (a document every question reads):
    its live keys per layer (views), every shard's positions and lengths, what windows dropped."""

    def __init__(self, cache: ShardedKVCache, shard: int):
        """shard: the ring shard this rank stores."""
        self.kind, self.tokens, self.shard = cache.kind, cache.total_tokens, shard
        self.shard_lengths = list(cache.shard_lengths)
        self.positions = [cache.shard_positions(r) for r in range(len(cache.shard_lengths))]
        held = set(getattr(getattr(cache, "prefix", None), "layers", {})) | {
            i for i, kv in cache.layers.items() if kv.planes is not None}
        self.layers = {i: cache.stored(i) for i in sorted(held)}  # a prefixed cache's: its prefix's runs, then its own
        self.evicted = dict(cache.evicted)
        # positions the buffers it keeps alive were reserved for (its own, not a prefix's), over all ring shards
        self.held = max((kv.capacity for kv in cache.layers.values()), default=0) * len(self.shard_lengths)

    def truncated(self, tokens: int) -> "SharedPrefix":
        """The same keys up to position `tokens` (views, no copy): shard positions ascend, so that is
        a prefix of every shard. Only a cache that never dropped a key can be cut short."""
        if tokens >= self.tokens:
            return self
        if self.evicted:
            raise ValueError("a cache whose windows dropped keys cannot be cut short: share it pinned")
        cut = object.__new__(SharedPrefix)
        cut.kind, cut.tokens, cut.shard, cut.evicted, cut.held = self.kind, tokens, self.shard, {}, self.held
        cut.positions = [p[: int((p < tokens).sum())] for p in self.positions]
        cut.shard_lengths = [p.numel() for p in cut.positions]
        mine = cut.shard_lengths[self.shard]
        cut.layers = {i: kv.slice(0, mine) for i, kv in self.layers.items()}
        return cut


class PrefixedKVCache(ShardedKVCache):
    """A request's cache after a shared prefix: the prefix's keys read where they lie, the
    request's own stored here. Lengths and positions count both (shard r holds the prefix's keys
    of shard r, then its own), so attention, ring hops and the decode owner rule see one cache."""

    def __init__(self, prefix: SharedPrefix, reserve_tokens: int = 0):
        super().__init__(len(prefix.shard_lengths), reserve_tokens, prefix.kind)
        self.prefix = prefix
        self.shard_lengths = list(prefix.shard_lengths)
        self.evicted = dict(prefix.evicted)
        self.pinned = True  # the shared keys are never dropped; a request's own are few

    def _own(self, shard: int) -> int:
        return self.shard_lengths[shard] - self.prefix.shard_lengths[shard]

    def shard_positions(self, shard: int) -> torch.Tensor:
        return torch.cat([self.prefix.positions[shard], self._positions[shard][: self._own(shard)]])

    def stored(self, idx: int, like: torch.Tensor | None = None):
        shared, own = self.prefix.layers.get(idx), self.layers.get(idx)
        if own is None or own.planes is None:
            return shared if shared is not None else self.layer(idx).stored(like)
        return own.stored(like) if shared is None else ChainedKV([shared, own.stored(like)])


def held_kv_bytes(states: list, prefixes: list) -> int:
    """Bytes of the KV buffers behind these attention states and shared prefixes, each buffer once."""
    storages: dict[int, int] = {}

    def keep(tensors) -> None:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    for state in states:
        for kv in list(state.cache.layers.values()):
            keep(kv.planes or ())
    read = [getattr(state.cache, "prefix", None) for state in states]  # one no longer shared lives while read
    for prefix in [*prefixes, *read]:
        for stored in list(prefix.layers.values()) if prefix is not None else ():
            for _, run in stored.segments():
                keep(run.tensors())
    return sum(storages.values())
