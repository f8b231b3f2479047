"""Test bodies on N gloo ranks (spawned CPU processes) with a hard deadline.

The rank group itself is the package's (toolkit/bench/ranks.py, shared with the
benchmarks): ranks start once per world size and serve many bodies; an exception on any
rank fails the call with that rank's traceback; a hang past the deadline kills the group
and fails, never blocks. Tests get a shorter default deadline than benchmarks.
"""
from __future__ import annotations

from toolkit.bench.ranks import RankGroup, free_port

__all__ = ["RankPool", "Pools", "free_port"]


class RankPool(RankGroup):
    def run(self, fn, *args, timeout: float = 300.0, **kwargs) -> list:
        return super().run(fn, *args, timeout=timeout, **kwargs)


class Pools:
    """One live pool per world size for a test session; a broken pool is replaced."""

    def __init__(self):
        self._pools: dict[int, RankPool] = {}

    def __call__(self, world: int) -> RankPool:
        pool = self._pools.get(world)
        if pool is None or not pool.alive:
            pool = self._pools[world] = RankPool(world)
        return pool

    def close_world(self, world: int):
        """Free a big pool that later tests won't need."""
        pool = self._pools.pop(world, None)
        if pool is not None:
            pool.close()

    def close(self):
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
