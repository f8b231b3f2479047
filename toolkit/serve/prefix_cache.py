"""Rank 0's index of the prompts whose caches the engine shares (toolkit.engine.engine.Engine.share),
so that a prompt starting like an earlier one reads that one's keys by reference and prefills
only the rest (the same document, another question; many at once). Each fresh prompt is shared
once its prefill is done, while its answer is still being made; a request arriving while a prompt
it shares most of is still prefilling waits for it ("parked") and then reads it, so that eight
questions sent at once about one document prefill it once. Bounded by a token budget,
least recently used first out, never one a running request reads. A prompt is reused only by
a request of the same salt (its tenant and cache_salt): no client learns from cached_tokens, or
from the time a prefill takes, what another tenant's prompts began with.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MIN_REUSE = 32  # fewer shared tokens are prefilled again: reading them by reference saves less than it costs


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(eq=False)
class Entry:
    ids: list[int]
    pid: int          # the engine's shared prefix
    salt: str = ""
    users: int = 0    # running requests that read it
    parts: dict = field(default_factory=dict)  # tokens -> [its prefix id, readers]: one part per length


class PrefixCache:
    def __init__(self, engine, max_tokens: int):
        self.engine, self.max_tokens = engine, max_tokens
        self.entries: list[Entry] = []  # least recently used first
        self.pending: dict[int, tuple[list[int], str]] = {}  # rid -> (prompt, salt) until its prompt is shared
        self.parked: dict[int, list] = {}  # rid of a prompt still prefilling -> what waits to read it
        self.ready: list = []  # parked, and that prompt is shared now (or ended): to admit at the next intake
        engine.on_shared = self._shared

    @property
    def tokens(self) -> int:
        """Positions the kept caches hold, reserved room included (what they keep in memory)."""
        return sum(self.engine.prefixes[e.pid].held for e in self.entries)

    def find(self, ids: list[int], salt: str) -> tuple[Entry | None, int]:
        """The entry of this salt sharing the longest prefix with ids, and how many of its tokens the
        request may read (at least the last prompt token is left to prefill: its logits start the answer)."""
        best, reuse = None, 0
        for entry in self.entries:
            if entry.salt != salt:
                continue
            shared = min(common_prefix(entry.ids, ids), len(ids) - 1)
            if shared > reuse:
                best, reuse = entry, shared
        return (best, reuse) if reuse >= MIN_REUSE else (None, 0)

    def leader(self, ids: list[int], salt: str, reuse: int) -> int | None:
        """A request of this salt still prefilling a prompt that this one shares at least half of, and
        MIN_REUSE tokens more than the kept prompts offer (`reuse`): it is worth waiting for (its
        prefill is work this one would repeat beside it) -> its id, else None."""
        best, most = None, reuse + MIN_REUSE - 1
        for rid, (prompt, owner) in self.pending.items():
            if owner != salt:
                continue
            shared = min(common_prefix(prompt, ids), len(ids) - 1)
            if shared > most and 2 * shared >= len(prompt):
                best, most = rid, shared
        return best

    def park(self, rid: int, job) -> None:
        self.parked.setdefault(rid, []).append(job)

    def ended(self, rid: int) -> None:
        """Request rid ended (its prompt shared or not): what waited for it goes ahead."""
        self.pending.pop(rid, None)
        self.ready.extend(self.parked.pop(rid, ()))

    def take_ready(self) -> list:
        ready, self.ready = self.ready, []
        return ready

    @property
    def waiting(self) -> int:
        """Requests parked or ready, not yet in the engine."""
        return len(self.ready) + sum(len(jobs) for jobs in list(self.parked.values()))  # read from /metrics' thread

    def claim(self, entry: Entry, tokens: int) -> int:
        """A running request will read `tokens` of entry -> the prefix id it reads (the entry's, or a
        part of it cut short: a view, no copy). Requests reading the same part read one prefix, so a
        decode step reads its keys once for all of them (toolkit.engine.rows)."""
        entry.users += 1
        self.entries.remove(entry)
        self.entries.append(entry)  # the most recently used
        if tokens == len(entry.ids):
            return entry.pid
        part = entry.parts.get(tokens)
        if part is None:
            part = entry.parts[tokens] = [self.engine.prefixes.share_part(entry.pid, tokens), 0]
        part[1] += 1
        return part[0]

    def release(self, entry: Entry, pid: int) -> None:
        entry.users -= 1
        for tokens, part in list(entry.parts.items()):
            if part[0] == pid:
                part[1] -= 1
                if not part[1]:
                    del entry.parts[tokens]
                    self.engine.prefixes.retire(pid)
        self._trim()

    def _shared(self, rid: int, pid: int) -> None:
        """The engine shared request rid's prompt as pid (every rank; rank 0 keeps the index)."""
        ids, salt = self.pending.pop(rid, (None, ""))
        if ids is None:
            return
        self.entries.append(Entry(ids, pid, salt))
        self._trim()
        self.ready.extend(self.parked.pop(rid, ()))

    def _trim(self) -> None:
        for entry in list(self.entries):
            if self.tokens <= self.max_tokens:
                return
            if not entry.users:
                self.entries.remove(entry)
                self.engine.prefixes.retire(entry.pid)
