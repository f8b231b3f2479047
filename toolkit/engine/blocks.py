"""The KV cache's block pool as the scheduler sees it: fixed-size blocks of token positions,
handed out to requests and taken back. Rank 0 keeps it; every rank follows the plans made
from it, so every rank's tables are the same. A block counts `block_size` positions of a
request's sequence; each rank stores its share of them (its heads under Ulysses and TP, its
positions under ring), so one count of blocks bounds the cache on every rank alike.

Pure Python: no torch, so it can be tested exhaustively."""
from __future__ import annotations


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class PoolExhausted(RuntimeError):
    """Asked for more blocks than are free (the scheduler checks first; this is a bug if seen)."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs at least one block of at least one token, "
                             f"got {num_blocks} blocks of {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._returned: list[int] = []  # blocks given back (reused first), then ids never handed out
        self._fresh = 0
        self.tables: dict[int, list[int]] = {}  # request id -> its blocks, in sequence order

    @property
    def free(self) -> int:
        return len(self._returned) + self.num_blocks - self._fresh

    @property
    def used(self) -> int:
        return self.num_blocks - self.free

    @property
    def tokens(self) -> int:
        """Positions the whole pool holds."""
        return self.num_blocks * self.block_size

    def held(self, rid: int) -> int:
        return len(self.tables.get(rid, ()))

    def missing(self, rid: int, tokens: int) -> int:
        """Blocks request `rid` lacks to hold `tokens` positions."""
        return max(0, blocks_for(tokens, self.block_size) - self.held(rid))

    def fits(self, rid: int, tokens: int) -> bool:
        """The blocks rid lacks to hold `tokens` positions are free."""
        return self.missing(rid, tokens) <= self.free

    @staticmethod
    def shares(a: int, b: int) -> bool:
        """Requests a and b draw on the same blocks (one pool: always)."""
        return True

    def grow(self, rid: int, tokens: int) -> list[int]:
        """Give `rid` the blocks it lacks to hold `tokens` positions -> the new blocks."""
        n = self.missing(rid, tokens)
        if n > self.free:
            raise PoolExhausted(f"request {rid} needs {n} more blocks and {self.free} are free")
        reused = [self._returned.pop() for _ in range(min(n, len(self._returned)))]
        fresh = list(range(self._fresh, self._fresh + n - len(reused)))
        self._fresh += len(fresh)
        self.tables.setdefault(rid, []).extend(reused + fresh)
        return reused + fresh

    def release(self, rid: int) -> int:
        """Every block of `rid` back to the pool -> how many."""
        blocks = self.tables.pop(rid, [])
        self._returned.extend(reversed(blocks))
        return len(blocks)
