"""Where one request runs under elastic sequence parallelism: an aligned block of the
sequence-parallel ranks, with a Ulysses x ring split of its own.

The SP ranks of a layout are ordered ring-major (SP rank = ring * ulysses + u). A block of d
consecutive SP ranks is a layout by itself when d divides the Ulysses degree (one ring rank's
Ulysses ranks, or some of them: ulysses=d, ring=1) or is the Ulysses degree times a divisor of
the ring (whole Ulysses groups of d/ulysses consecutive ring ranks). Each such block keeps the
launched layout's rules: its Ulysses degree divides the launched one, so it divides the heads
the launched one divides; tensor parallelism is whole in every block (a request always spans
a whole TP group). Pipeline stages are not split: elastic placement needs pp = 1.

Pure (no torch): the scheduler places requests with it, the topology builds groups from it.
"""
from __future__ import annotations

from dataclasses import dataclass


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Placement:
    """SP ranks first .. first + ulysses * ring - 1, split ulysses x ring (ring-major inside)."""

    ulysses: int
    ring: int
    first: int

    @property
    def degree(self) -> int:
        return self.ulysses * self.ring

    @property
    def members(self) -> range:
        return range(self.first, self.first + self.degree)

    def label(self) -> str:
        return f"sp ranks {self.first}-{self.first + self.degree - 1} (ulysses={self.ulysses} ring={self.ring})"


def sub_layouts(ulysses: int, ring: int) -> list[tuple[int, int]]:
    """(ulysses, ring) of every degree a request may get, fewest ranks first."""
    return [(u, 1) for u in divisors(ulysses)] + [(ulysses, r) for r in divisors(ring) if r > 1]


def placements(ulysses: int, ring: int) -> list[Placement]:
    """Every block a request may run on, by degree then position; the last spans every SP rank."""
    sp = ulysses * ring
    return [Placement(u, r, first) for u, r in sub_layouts(ulysses, ring) for first in range(0, sp, u * r)]


def block_ranks(placement: Placement, dim: str, tp: int, tp_rank: int, sp_rank: int) -> list[int]:
    """Global ranks of the `dim` group ("ulysses", "ring" or "sp") of the SP rank sp_rank inside
    `placement`, for TP slot tp_rank (pp = 1: global rank = sp_rank * tp + tp_rank)."""
    inner = sp_rank - placement.first  # ring-major inside the block: inner = r * ulysses + u
    r, u = divmod(inner, placement.ulysses)
    if dim == "ulysses":
        inners = [r * placement.ulysses + i for i in range(placement.ulysses)]
    elif dim == "ring":
        inners = [i * placement.ulysses + u for i in range(placement.ring)]
    elif dim == "sp":
        inners = list(range(placement.degree))
    else:
        raise ValueError(f"a placement has ulysses, ring and sp groups, not {dim!r}")
    return [(placement.first + i) * tp + tp_rank for i in inners]
