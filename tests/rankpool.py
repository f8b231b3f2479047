"""Run a test body on N gloo ranks (spawned CPU processes) with a hard deadline.

Ranks are started once per world size and reused by many bodies (process start-up and
imports cost seconds each; DESIGN.md section 5). A body is a module-level function; each
rank calls it and returns a picklable value. An exception on any rank fails the call with
that rank's traceback; a hang past the deadline kills the pool and fails, never blocks.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, env: dict, inbox, results):
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank % int(env.get("LOCAL_WORLD_SIZE", world))))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    except Exception:  # noqa: BLE001 - report, then stop
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, "ready"))
    while True:
        item = inbox.get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - every failure goes back to the test
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world: int, env: dict | None = None, start_timeout: float = 120.0):
        ctx = mp.get_context("spawn")
        self.world = world
        self.results = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(world)]
        port = free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world, port, dict(env or {}), self.inboxes[r], self.results), daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self._collect(start_timeout, "start")

    def _collect(self, timeout: float, what: str) -> list:
        deadline = time.monotonic() + timeout
        values: dict[int, object] = {}
        while len(values) < self.world:
            left = deadline - time.monotonic()
            dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in values]
            if left <= 0 or (dead and self.results.empty()):
                self.close()
                why = f"ranks {dead} died" if dead else f"deadline of {timeout:.0f}s passed"
                raise AssertionError(f"{what} on {self.world} ranks failed: {why}; ranks done: {sorted(values)}")
            try:
                rank, ok, value = self.results.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if not ok:
                self.close()
                raise AssertionError(f"rank {rank} of {self.world} raised in {what}:\n{value}")
            values[rank] = value
        return [values[r] for r in range(self.world)]

    def run(self, fn, *args, timeout: float = 300.0, **kwargs) -> list:
        """fn(*args, **kwargs) on every rank -> list of return values by rank."""
        if not self.alive:
            raise AssertionError("this rank pool was closed after an earlier failure")
        for inbox in self.inboxes:
            inbox.put((fn, args, kwargs))
        return self._collect(timeout, getattr(fn, "__name__", "body"))

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self):
        for inbox in self.inboxes:
            try:
                inbox.put(None)
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + 5
        for p in self.procs:
            p.join(max(deadline - time.monotonic(), 0.1))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5)


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
