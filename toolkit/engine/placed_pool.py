"""The KV block pool under elastic sequence parallelism: one pool per SP rank, and where each
request runs (toolkit.distributed.placement).

A pool's block is `block_size` positions of a request that spans every SP rank, as the
launched layout stores them (1/ring of the positions, 1/ulysses of the heads); a request on d
of the D ranks stores D/d times as much of each position on each of its ranks, so it holds D/d
blocks per `block_size` positions on each of them. One count of blocks per rank thus bounds
every rank's cache whatever mix of degrees runs.

Pure Python: no torch (tests/test_elastic_scheduler.py)."""
from __future__ import annotations

from typing import Callable

from ..distributed.placement import Placement
from .blocks import BlockPool, blocks_for


class PlacedPool:
    def __init__(self, num_blocks: int, block_size: int, blocks: list[Placement]):
        self.blocks = blocks  # every placement a request may get; the last spans every SP rank
        self.sp = blocks[-1].degree
        self.pools = [BlockPool(num_blocks, block_size) for _ in range(self.sp)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.where: dict[int, Placement] = {}  # rid -> its placement, from admission to release

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free(self) -> int:
        """Blocks free on the fullest rank."""
        return min(p.free for p in self.pools)

    @property
    def used(self) -> int:
        return max(p.used for p in self.pools)

    def holds(self, degree: int, tokens: int) -> bool:
        """A request of `tokens` positions on `degree` ranks fits each rank's pool when it is alone."""
        return blocks_for(tokens, self.block_size) * (self.sp // degree) <= self.num_blocks

    def place(self, rid: int, placement: Placement) -> None:
        self.where[rid] = placement

    def _need(self, rid: int, tokens: int) -> int:
        """Blocks rid needs on each of its ranks to hold `tokens` positions."""
        return blocks_for(tokens, self.block_size) * (self.sp // self.where[rid].degree)

    def held(self, rid: int) -> int:
        p = self.where.get(rid)
        return 0 if p is None else self.pools[p.first].held(rid)

    def missing(self, rid: int, tokens: int) -> int:
        return max(0, self._need(rid, tokens) - self.held(rid))

    def fits(self, rid: int, tokens: int) -> bool:
        n = self.missing(rid, tokens)
        return all(self.pools[r].free >= n for r in self.where[rid].members)

    def grow(self, rid: int, tokens: int) -> None:
        need = self._need(rid, tokens) * self.block_size  # positions whose blocks are exactly those
        for r in self.where[rid].members:
            self.pools[r].grow(rid, need)

    def release(self, rid: int) -> int:
        p = self.where.pop(rid, None)
        return 0 if p is None else max(self.pools[r].release(rid) for r in p.members)

    def shares(self, a: int, b: int) -> bool:
        """Requests a and b hold blocks on some rank alike (preempting one frees room for the other)."""
        pa, pb = self.where.get(a), self.where.get(b)
        return pa is not None and pb is not None and bool(set(pa.members) & set(pb.members))

    def load(self, placement: Placement) -> tuple[int, int]:
        """(requests, blocks used) on the busiest of its ranks: the placement to give work to is the least."""
        rows = max(sum(1 for p in self.where.values() if r in p.members) for r in placement.members)
        return rows, max(self.pools[r].used for r in placement.members)

    def busy_ranks(self) -> int:
        """SP ranks holding some request."""
        return len({r for p in self.where.values() for r in p.members})


class Placer:
    """Which blocks a new request may go to, best first: the degree `degree_for(prompt, new,
    loaded)` chooses (the planner's cost model, toolkit.planner.elastic, or a threshold; loaded:
    requests wait behind it), raised until its cache fits one rank's pool; then that degree's
    blocks, least loaded first. A request reading a shared prefix goes where the prefix lies."""

    def __init__(self, pool: PlacedPool, degree_for: Callable[[int, int, bool], int]):
        self.pool, self.degree_for = pool, degree_for
        self.degrees = sorted({p.degree for p in pool.blocks})

    def degree(self, prompt_tokens: int, most: int, loaded: bool = False) -> int:
        wanted = self.degree_for(prompt_tokens, most - prompt_tokens, loaded)
        fitting = [d for d in self.degrees if d >= wanted and self.pool.holds(d, most)]
        return fitting[0] if fitting else self.degrees[-1]

    def choices(self, prompt_tokens: int, most: int, home: Placement | None = None,
                loaded: bool = False) -> list[Placement]:
        if home is not None:
            return [home]
        d = self.degree(prompt_tokens, most, loaded)
        return sorted((p for p in self.pool.blocks if p.degree == d), key=self.pool.load)
