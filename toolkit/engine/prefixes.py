"""The caches requests read by reference (a document's, a kept prompt's), by id, the same on
every rank: rank 0 decides (share a prompt, cut a part of one, retire one) and the other ranks
follow from the next step's plan, in the same order, so an id names the same keys everywhere."""
from __future__ import annotations

from .cache import SharedPrefix


class SharedPrefixes:
    def __init__(self):
        self._by_id: dict[int, SharedPrefix] = {}
        self._next = 0
        self._parts: list[tuple[int, int]] = []  # rank 0: prefixes cut short, for the other ranks to follow
        self._retired: list[int] = []            # rank 0: prefixes every rank forgets

    def share(self, state, tokens: int | None = None) -> int:
        """Every rank: a prefilled cache (its first `tokens` positions) that requests may read by
        reference -> its id. The cache must not change while shared: requests after it store only
        their own keys."""
        prefix = SharedPrefix(state.cache, state.r_rank)
        return self._keep(prefix if tokens is None else prefix.truncated(tokens))

    def share_part(self, pid: int, tokens: int) -> int:
        """Rank 0: the first `tokens` positions of shared prefix pid, shared on their own -> a new id
        (no copy); the other ranks make the same at the next step."""
        self._parts.append((pid, tokens))
        return self._keep(self._by_id[pid].truncated(tokens))

    def retire(self, pid: int) -> None:
        """Rank 0: every rank forgets shared prefix pid (at the next step)."""
        self.unshare(pid)
        self._retired.append(pid)

    def unshare(self, pid: int) -> None:
        """No new request reads it (running ones keep their reference until they end)."""
        self._by_id.pop(pid, None)

    def _keep(self, prefix: SharedPrefix) -> int:
        pid, self._next = self._next, self._next + 1
        self._by_id[pid] = prefix
        return pid

    # ---- news for the other ranks ------------------------------------------------------------
    @property
    def has_news(self) -> bool:
        return bool(self._parts or self._retired)

    def news(self) -> dict:
        """Rank 0: what the other ranks must do alike, for the next plan (and forgotten here)."""
        news, self._parts, self._retired = {"parts": self._parts, "retire": self._retired}, [], []
        return news

    def follow(self, plan: dict) -> None:
        """Another rank: do what rank 0 did, in the same order."""
        for pid, tokens in plan.get("parts", ()):
            self._keep(self._by_id[pid].truncated(tokens))
        for pid in plan.get("retire", ()):
            self.unshare(pid)

    # ---- reading -----------------------------------------------------------------------------
    def __getitem__(self, pid: int) -> SharedPrefix:
        return self._by_id[pid]

    def __contains__(self, pid: int) -> bool:
        return pid in self._by_id

    def values(self) -> list[SharedPrefix]:
        return list(self._by_id.values())
