"""The caches requests read by reference (a document's, a kept prompt's), by id, the same on
every rank: rank 0 decides (share a prompt, cut a part of one, retire one) and the other ranks
follow from the next step's plan, in the same order, so an id names the same keys everywhere."""
from __future__ import annotations

from .cache import SharedPrefix


class Elsewhere:
    """A shared prefix whose keys lie on other ranks (elastic placement put its request there):
    held here for its id and length, so ids and lengths stay the same on every rank."""

    def __init__(self, tokens: int):
        self.tokens = self.held = tokens  # held: the positions it keeps on its own ranks, about

    def truncated(self, tokens: int) -> "Elsewhere":
        return Elsewhere(min(tokens, self.tokens))


class SharedPrefixes:
    def __init__(self):
        self._by_id: dict[int, SharedPrefix] = {}
        self._next = 0
        self._parts: list[tuple[int, int]] = []  # rank 0: prefixes cut short, for the other ranks to follow
        self._retired: list[int] = []            # rank 0: prefixes every rank forgets
        self._homes: dict[int, int] = {}         # pid -> the block its keys lie on (elastic; absent: every rank)

    def share(self, state, tokens: int | None = None, home: int | None = None) -> int:
        """Every rank: a prefilled cache (its first `tokens` positions) that requests may read by
        reference -> its id. The cache must not change while shared: requests after it store only
        their own keys. state None: its keys lie on other ranks (on block `home`)."""
        prefix = Elsewhere(tokens) if state is None else SharedPrefix(state.cache, state.r_rank)
        return self._keep(prefix if tokens is None else prefix.truncated(tokens), home)

    def share_part(self, pid: int, tokens: int) -> int:
        """Rank 0: the first `tokens` positions of shared prefix pid, shared on their own -> a new id
        (no copy); the other ranks make the same at the next step."""
        self._parts.append((pid, tokens))
        return self._keep(self._by_id[pid].truncated(tokens), self._homes.get(pid))

    def retire(self, pid: int) -> None:
        """Rank 0: every rank forgets shared prefix pid (at the next step)."""
        self.unshare(pid)
        self._retired.append(pid)

    def unshare(self, pid: int) -> None:
        """No new request reads it (running ones keep their reference until they end)."""
        self._by_id.pop(pid, None)
        self._homes.pop(pid, None)

    def _keep(self, prefix, home: int | None = None) -> int:
        pid, self._next = self._next, self._next + 1
        self._by_id[pid] = prefix
        if home is not None:
            self._homes[pid] = home
        return pid

    def home(self, pid: int | None) -> int | None:
        """The block a request reading prefix pid must run on (None: every SP rank, or no prefix)."""
        return self._homes.get(pid)

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
            self._keep(self._by_id[pid].truncated(tokens), self._homes.get(pid))
        for pid in plan.get("retire", ()):
            self.unshare(pid)

    # ---- reading -----------------------------------------------------------------------------
    def __getitem__(self, pid: int) -> SharedPrefix:
        return self._by_id[pid]

    def __contains__(self, pid: int) -> bool:
        return pid in self._by_id

    def values(self) -> list[SharedPrefix]:
        """The prefixes whose keys this rank holds."""
        return [p for p in self._by_id.values() if isinstance(p, SharedPrefix)]
