"""The KV caches of recent prompts, kept so that a prompt sharing a prefix with one of them
prefills only the rest (the same document, another question). Bounded by a token budget,
least recently used first out. Every rank keeps the same entries: the choices depend only on
the token ids and the salt, which every rank is given. An entry is reused only by a request of
the same salt (its tenant and cache_salt): no client learns from cached_tokens, or from the
time a prefill takes, what another tenant's prompts began with.

An entry's cache holds its prompt. To reuse the first L tokens of it, each ring shard keeps
its positions below L: shard positions ascend (prefill appends chunk after chunk), so that
is a prefix of each shard, and nothing is copied.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.prefill import prefill as run_prefill


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Entry:
    ids: list[int]
    state: object                 # SequenceParallelAttention holding the cache
    salt: str = ""


class PrefixCache:
    def __init__(self, lcm, max_tokens: int):
        self.lcm, self.max_tokens = lcm, max_tokens
        self.entries: list[Entry] = []  # least recently used first

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.entries)

    def _truncate(self, entry: Entry, keep: int):
        cache = entry.state.cache
        kept = [cache.shard_positions(r) for r in range(len(cache.shard_lengths))]
        kept = [p[: int((p < keep).sum())] for p in kept]  # ascending: a prefix of every shard
        cache.set_positions(kept)
        mine = cache.shard_lengths[entry.state.r_rank]
        for kv in cache.layers.values():
            kv.length = mine
        entry.ids = entry.ids[:keep]

    def prefill(self, ids: list[int], reserve_new_tokens: int, salt: str = "") -> tuple[Entry, torch.Tensor, int]:
        """(entry now holding ids, last logits [V], tokens reused): the longest prefix shared with an entry of
        the same salt is kept, at least the last token is prefilled (its logits start the answer)."""
        lcm = self.lcm
        best, reuse = None, 0
        for entry in self.entries:
            if entry.salt != salt:
                continue
            shared = min(common_prefix(entry.ids, ids), len(ids) - 1)
            if shared > reuse:
                best, reuse = entry, shared
        if best is None:
            state = lcm.new_state(lcm._reserve(len(ids), reserve_new_tokens))
            state.cache.pinned = True  # kept for shorter prefixes too: a window's old keys stay
            best = Entry([], state, salt)
        else:
            self.entries.remove(best)
            self._truncate(best, reuse)
        rest = ids[reuse:]
        logits = run_prefill(lcm.model, torch.tensor([rest]), best.state, lcm.chunk_size, None, lcm.stage,
                             offset=reuse)
        best.ids = list(ids)
        return best, logits, reuse

    def keep(self, entry: Entry):
        """Back in as the most recent; the oldest go while the budget is exceeded."""
        self.entries.append(entry)
        while self.entries and self.tokens > self.max_tokens:
            self.entries.pop(0)
