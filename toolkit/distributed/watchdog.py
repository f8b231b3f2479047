"""Know which rank failed: every rank beats a heartbeat into the rendezvous store.

When a collective raises (a peer's socket closed, or the `--timeout` passed) or the
launcher stops us because a peer died, the survivor reads the heartbeats and names the
ranks that went quiet, so the user sees "rank 2 stopped responding" instead of a hang or
a gloo stack trace. torch is imported only when a heartbeat runs, so the CLI can hold this
module from its first line.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import signal
import sys
import threading
import time

PREFIX = "lctk/heartbeat/"


def _store():
    import torch.distributed as dist

    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no default group, or a backend without a store
        return None


class Heartbeat:
    """A daemon thread writing this rank's wall-clock time every `interval` seconds."""

    def __init__(self, rank: int, world: int, interval: float = 0.5):
        self.rank, self.world, self.interval = rank, world, interval
        self.store = _store()
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> "Heartbeat":
        if self.store is None or self.world == 1:
            return self
        self._beat()
        self._thread = threading.Thread(target=self._run, name="lctk-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a daemon thread caught inside a store call at exit aborts the process
        return self

    def _beat(self):
        self.store.set(PREFIX + str(self.rank), repr(time.time()))

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store is gone: its host died; stop beating
                return

    def stop(self):
        self._stop.set()

    def close(self):
        """Stop and wait for the beating thread (at most one beat)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 2)

    def silent_ranks(self, stale_after: float = 3.0) -> list[int] | None:
        """Ranks whose last beat is older than `stale_after` seconds (None: store unreachable)."""
        if self.store is None:
            return None
        now, silent = time.time(), []
        try:
            self.store.set_timeout(datetime.timedelta(seconds=2))
            for rank in range(self.world):
                if rank == self.rank:
                    continue
                key = PREFIX + str(rank)
                if not self.store.check([key]) or now - float(self.store.get(key)) > stale_after:
                    silent.append(rank)
        except Exception:  # noqa: BLE001 - the store's host (rank 0 under some launchers) is dead
            return None
        return silent

    def failure_message(self, err: BaseException | None = None, wait: float = 4.0) -> str:
        """One line for stderr: who this rank is and which ranks went quiet."""
        deadline = time.monotonic() + wait
        silent = self.silent_ranks()
        while silent == [] and time.monotonic() < deadline:  # a dead rank's beat needs ~3 s to go stale
            time.sleep(0.25)
            silent = self.silent_ranks()
        cause = f" ({type(err).__name__}: {str(err).splitlines()[0][:160]})" if err and str(err) else ""
        if silent is None:
            who = "the rank hosting the rendezvous store (rank 0) or the launcher failed"
        elif silent:
            who = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped responding"
        else:
            who = "no rank went quiet: a peer raised an error or the collective timed out"
        return f"rank {self.rank}: stopping because {who}{cause}"


_active: Heartbeat | None = None  # one process group per process, so one heartbeat


def heartbeat_running() -> bool:
    """True in a multi-rank job once its topology is built."""
    return _active is not None and _active.world > 1


def start_heartbeat(rank: int, world: int) -> Heartbeat:
    global _active
    if _active is None or (_active.rank, _active.world) != (rank, world):
        if _active is not None:
            _active.stop()
        _active = Heartbeat(rank, world).start()
    return _active


_COMM_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout",
                 "processgroup", "peer", "socket")


def is_communication_failure(err: BaseException) -> bool:
    """A peer died or a collective timed out (not a bug every rank hit the same way)."""
    import torch.distributed as dist

    if isinstance(err, (RankStopped, dist.DistError)):
        return True
    return any(marker in str(err).lower() for marker in _COMM_MARKERS)


class RankStopped(Exception):
    """The launcher asked this rank to stop (SIGTERM), usually because a peer died."""


def report_failure(err: BaseException, stream=None) -> None:
    """In a multi-rank job, a communication failure ends this rank now: one line naming
    the failed rank, exit code 1. Anything else returns, for the caller to handle."""
    if _active is None or _active.world == 1 or not is_communication_failure(err):
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's stop must not cut the report short
    print(_active.failure_message(err), file=stream or sys.stderr, flush=True)
    os._exit(1)  # never wait in atexit or process-group teardown for a dead peer


def raise_rank_stopped(signum=None, frame=None):
    raise RankStopped("the launcher stopped this rank")


@contextlib.contextmanager
def fail_fast(stream=None):
    """Run a multi-rank job so that a failure anywhere ends this rank quickly, with one
    line naming the failed rank, and exit code 1; single-process errors propagate as usual."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_rank_stopped) if main else None
    try:
        yield
    except (RuntimeError, RankStopped) as err:
        report_failure(err, stream)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
