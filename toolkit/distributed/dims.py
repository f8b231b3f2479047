"""The degrees of one layout and its rank arithmetic: which global ranks form each group.

Pure (no torch): the planner validates layouts with it, the topology builds its process
groups from it. Rank order, outermost to innermost, is (pp, ring, ulysses, tp): TP ranks
are consecutive, then Ulysses, then ring, then PP. The rules a layout must obey (heads,
nodes) live in planner/rules.py.
"""
from __future__ import annotations

from dataclasses import dataclass

DEGREE_NAMES = ("tp", "ulysses", "ring", "pp")


def rank_groups(tp: int, ulysses: int, ring: int, pp: int) -> dict[str, list[list[int]]]:
    """Global ranks of every group, with rank = ((p*ring + r)*ulysses + u)*tp + t.

    "sp" is the sequence-parallel group (ulysses x ring) of one TP slot and one stage, in
    SP-rank order (ring-major): SP rank = r*ulysses + u.
    """
    sizes = {"pp": pp, "ring": ring, "ulysses": ulysses, "tp": tp, "sp": ulysses * ring}
    strides = {"tp": 1, "ulysses": tp, "ring": tp * ulysses, "pp": tp * ulysses * ring, "sp": tp}
    world = tp * ulysses * ring * pp
    groups: dict[str, list[list[int]]] = {}
    for name in (*DEGREE_NAMES, "sp"):
        stride, size = strides[name], sizes[name]
        by_base: dict[int, list[int]] = {}
        for rank in range(world):
            base = rank - ((rank // stride) % size) * stride  # same rank, coordinate 0
            by_base.setdefault(base, []).append(rank)
        groups[name] = list(by_base.values())
    return groups


@dataclass(frozen=True)
class ParallelDims:
    """The degrees of one layout and the rank arithmetic that follows from them (pure)."""

    tp: int = 1
    ulysses: int = 1
    ring: int = 1
    pp: int = 1

    def __post_init__(self):
        for name in DEGREE_NAMES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} degree must be a positive integer, got {value!r}")

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def world(self) -> int:
        return self.tp * self.ulysses * self.ring * self.pp

    def coords(self, rank: int) -> dict:
        return dict(tp=rank % self.tp, ulysses=(rank // self.tp) % self.ulysses,
                    ring=(rank // (self.tp * self.ulysses)) % self.ring,
                    pp=rank // (self.tp * self.ulysses * self.ring))

    def rank_of(self, tp=0, ulysses=0, ring=0, pp=0) -> int:
        return ((pp * self.ring + ring) * self.ulysses + ulysses) * self.tp + tp

    def group_ranks(self, dim: str) -> list[list[int]]:
        """All rank lists of the groups along dim ('tp', 'ulysses', 'ring', 'sp', 'pp')."""
        return rank_groups(self.tp, self.ulysses, self.ring, self.pp)[dim]

    def label(self) -> str:
        return f"tp={self.tp} ulysses={self.ulysses} ring={self.ring} pp={self.pp}"
