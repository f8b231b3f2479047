"""Run a function on N gloo ranks (spawned processes of this machine), many times, without
restarting them: the tests' rank pools and the benchmarks' rank groups.

Each rank pays seconds of imports once (ARCHITECTURE.md, Facts), then serves calls: every
rank calls fn(*args) and sends back its result; an exception on any rank fails the call
with that rank's traceback; a deadline turns a hang into an error. The ranks keep state
between calls (a module-level dict), so a model built once is timed many times.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from contextlib import contextmanager


@contextmanager
def environment(env: dict | None):
    """os.environ with `env` added while the block runs: processes started inside get it
    from exec (allocator settings must be there before the interpreter starts)."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, threads: int, env: dict, inbox, results):
    # ranks have no stdout of their own: what they print (DeepSpeed logs to stdout) goes to
    # stderr, so the driver's stdout (`lctk bench --json`) stays one JSON object
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=os.environ.get("LOCAL_RANK", str(rank)),
                      LOCAL_WORLD_SIZE=os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    except Exception:  # noqa: BLE001 - report and stop
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
        except BaseException:  # noqa: BLE001 - every failure goes back to the caller
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankGroup:
    """`with RankGroup(2, threads=1) as ranks: ranks.run(fn, ...)` -> [result of rank 0, ...]."""

    def __init__(self, world: int, threads: int = 1, env: dict | None = None, start_timeout: float = 180.0):
        ctx = mp.get_context("spawn")
        self.world, self.threads = world, threads
        self.results = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(world)]
        port = free_port()
        self.procs = [ctx.Process(target=_rank_main, daemon=True,
                                  args=(r, world, port, threads, dict(env or {}), self.inboxes[r], self.results))
                      for r in range(world)]
        with environment(env):  # in the children's environment from exec (allocator settings)
            for p in self.procs:
                p.start()
        self._collect(start_timeout, "start-up")

    def __enter__(self) -> "RankGroup":
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _collect(self, timeout: float, what: str) -> list:
        deadline = time.monotonic() + timeout
        values: dict[int, object] = {}
        while len(values) < self.world:
            left = deadline - time.monotonic()
            dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in values]
            if left <= 0 or (dead and self.results.empty()):
                self.close()
                why = f"ranks {dead} died" if dead else f"the deadline of {timeout:.0f} s passed"
                raise RuntimeError(f"{what} on {self.world} ranks failed: {why}")
            try:
                rank, ok, value = self.results.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if not ok:
                self.close()
                raise RuntimeError(f"rank {rank} of {self.world} raised in {what}:\n{value}")
            values[rank] = value
        return [values[r] for r in range(self.world)]

    def run(self, fn, *args, timeout: float = 1800.0, **kwargs) -> list:
        if not self.alive:
            raise RuntimeError("this rank group was closed after an earlier failure")
        for inbox in self.inboxes:
            inbox.put((fn, args, kwargs))
        return self._collect(timeout, getattr(fn, "__name__", "call"))

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self):
        for inbox in self.inboxes:
            try:
                inbox.put(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            p.join(max(deadline - time.monotonic(), 0.1))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5)


# ---- state kept on every rank between calls --------------------------------------------------
STATE: dict = {}


def forget(key: str | None = None) -> bool:
    """Drop what a rank keeps (one key, or everything) so its memory goes back."""
    import gc

    if key is None:
        STATE.clear()
    else:
        STATE.pop(key, None)
    gc.collect()
    return True
