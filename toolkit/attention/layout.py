"""How a sequence (one prefill chunk, or a whole prompt) is cut across sequence-parallel ranks.

The SP group is ring x ulysses. The sequence is padded at its global end, cut into `ring`
pieces (contiguous, or zigzag: 2*ring sub-chunks, piece r = sub-chunks r and 2*ring-1-r, so
causal work is balanced), and each piece is cut contiguously into `ulysses` slices. After
the Ulysses all-to-all a rank holds its whole ring piece, in position order, for its heads.
Padding sits after every real token, so with a causal mask it never reaches a real one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .choices import SEQUENCE_LAYOUTS as LAYOUTS


@dataclass(frozen=True)
class SequenceLayout:
    kind: str = "zigzag"
    ring: int = 1
    ulysses: int = 1

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ValueError(f"sequence layout {self.kind!r} is unknown; use one of: {', '.join(LAYOUTS)}")
        if self.ring < 1 or self.ulysses < 1:
            raise ValueError(f"ring ({self.ring}) and ulysses ({self.ulysses}) degrees must be >= 1")

    @property
    def world(self) -> int:
        return self.ring * self.ulysses

    @property
    def zigzag(self) -> bool:
        return self.kind == "zigzag" and self.ring > 1

    @property
    def sub_chunks(self) -> int:
        """Number of equal sub-chunks the padded sequence is cut into before dealing to rings."""
        return 2 * self.ring if self.zigzag else self.ring

    def padded_length(self, n: int) -> int:
        unit = self.sub_chunks * self.ulysses
        return -(-n // unit) * unit

    def ring_piece(self, n_pad: int, ring_rank: int) -> torch.Tensor:
        """Global indices (ascending) of ring rank r's piece of a padded sequence."""
        c = n_pad // self.sub_chunks
        if self.zigzag:
            first = torch.arange(ring_rank * c, (ring_rank + 1) * c)
            second_idx = self.sub_chunks - 1 - ring_rank
            return torch.cat([first, torch.arange(second_idx * c, (second_idx + 1) * c)])
        return torch.arange(ring_rank * c, (ring_rank + 1) * c)

    def local_indices(self, n: int, ring_rank: int, ulysses_rank: int) -> torch.Tensor:
        """Global indices held by SP rank (ring_rank, ulysses_rank); values >= n are padding."""
        piece = self.ring_piece(self.padded_length(n), ring_rank)
        step = piece.numel() // self.ulysses
        return piece[ulysses_rank * step : (ulysses_rank + 1) * step]

    def split(self, x: torch.Tensor, ring_rank: int, ulysses_rank: int, dim: int = -1, pad_value=0):
        """This rank's shard of x along dim, padding the global end with pad_value."""
        n = x.shape[dim]
        n_pad = self.padded_length(n)
        if n_pad > n:
            pad_shape = list(x.shape)
            pad_shape[dim] = n_pad - n
            x = torch.cat([x, torch.full(pad_shape, pad_value, dtype=x.dtype, device=x.device)], dim=dim)
        idx = self.local_indices(n, ring_rank, ulysses_rank).to(x.device)
        return x.index_select(dim, idx)

    def unsplit(self, shards: list[torch.Tensor], n: int, dim: int = -1) -> torch.Tensor:
        """Inverse of split: shards ordered by SP rank = ring_rank * ulysses + ulysses_rank."""
        if len(shards) != self.world:
            raise ValueError(f"unsplit needs {self.world} shards, got {len(shards)}")
        idx = torch.cat([
            self.local_indices(n, r, u) for r in range(self.ring) for u in range(self.ulysses)
        ])
        whole = torch.cat(shards, dim=dim)
        order = torch.argsort(idx).to(whole.device)
        return whole.index_select(dim, order).narrow(dim, 0, n)


def chunk_spans(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) of each prefill chunk."""
    if chunk_size <= 0:
        raise ValueError(f"chunk size must be a positive number of tokens, got {chunk_size}")
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
