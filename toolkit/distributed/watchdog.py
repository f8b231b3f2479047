"""Know which rank failed: every rank beats a heartbeat into the rendezvous store.

When a collective raises (a peer's socket closed, or the `--timeout` passed) or the
launcher stops us because a peer died, the survivor reads the heartbeats and names the
ranks that went quiet, so the user sees "rank 2 stopped responding" instead of a hang or
a gloo stack trace. torch is imported only when a heartbeat runs, so the CLI can hold this
module from its first line.

Under NCCL a dead peer raises nothing: the survivors wait inside CUDA until the process
group's timeout, when NCCL aborts the process and no Python runs again. So the beating
thread also watches one neighbour (rank + 1: every rank is watched, and the store serves
one read per rank per beat): a neighbour whose beat has not changed for SILENT_S seconds
(of this rank's clock) is gone, and this rank prints its line and exits. The process
group's timeout is never shorter than SILENT_S + MARGIN_S (process_group_timeout), so the
watchdog's line always comes first. A rank that ends marks its beat "done" (or "stopped"
after its own failure line), so it is never reported as silent.
A hang in which every rank still beats ends at the process group's timeout as before.
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
DONE, STOPPED = b"done", b"stopped"  # the last beat of a rank that ended normally, or after reporting a failure
BEAT_S = 0.5  # a live rank writes its beat this often
SILENT_S = 15.0  # a beat unchanged this long: dead or frozen (launchers kill the survivors ~30 s after a death)
MARGIN_S = 30.0  # the process group gives up at least this long after the watchdog would have spoken


def process_group_timeout(timeout_s: float) -> float:
    """The process group's timeout for `--timeout SECONDS`: as asked, but never before the
    watchdog has named a silent rank (NCCL's abort at the timeout ends the process silently)."""
    return max(float(timeout_s), SILENT_S + BEAT_S + MARGIN_S)


def _store():
    import torch.distributed as dist

    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no default group, or a backend without a store
        return None


class Heartbeat:
    """A daemon thread writing this rank's wall-clock time every `interval` seconds and watching
    its neighbour's; `on_silent(line)` (default: print it, exit 1) when that stays unchanged
    `silent_s` seconds. `store`: the default group's rendezvous store unless given."""

    def __init__(self, rank: int, world: int, interval: float = BEAT_S, silent_s: float = SILENT_S,
                 store=None, on_silent=None):
        self.rank, self.world, self.interval, self.silent_s = rank, world, interval, silent_s
        self.store = store if store is not None else _store()
        self.on_silent = on_silent or (lambda line: _stop_job(lambda: line))
        self._stop = threading.Event()
        self._thread = None
        self._seen = (None, time.monotonic())  # the neighbour's last beat, and when it changed

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
                quiet = self._neighbour_quiet_s()
            except Exception:  # noqa: BLE001 - the store is gone: its host died; stop beating
                return
            if quiet is not None and quiet > self.silent_s:
                peer = (self.rank + 1) % self.world
                self.on_silent(self.failure_message(wait=0, known=[peer], cause=f" (no heartbeat for {quiet:.0f} s)"))
                return

    def _neighbour_quiet_s(self) -> float | None:
        """Seconds since rank + 1's beat last changed (None: it has ended and said so)."""
        key = PREFIX + str((self.rank + 1) % self.world)
        value = self.store.get(key) if self.store.check([key]) else None  # not yet started: quiet since ours
        if value in (DONE, STOPPED):
            return None
        now = time.monotonic()
        if value != self._seen[0]:
            self._seen = (value, now)
        return now - self._seen[1]

    def stop(self):
        self._stop.set()

    def close(self, last: bytes = DONE):
        """Stop and wait for the beating thread (at most one beat); leave `last` as this rank's beat."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 2)
        if self._thread is not None:
            try:
                self.store.set(PREFIX + str(self.rank), last)
            except Exception:  # noqa: BLE001 - the store's host has ended already
                pass

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
                beat = self.store.get(key) if self.store.check([key]) else None
                if beat not in (DONE, STOPPED) and (beat is None or now - float(beat) > stale_after):
                    silent.append(rank)
        except Exception:  # noqa: BLE001 - the store's host (rank 0 under some launchers) is dead
            return None
        return silent

    def failure_message(self, err: BaseException | None = None, wait: float = 4.0, known=(), cause: str = "") -> str:
        """One line for stderr: who this rank is and which ranks went quiet (`known` ones too)."""
        deadline = time.monotonic() + wait
        silent = self.silent_ranks()
        while silent == [] and time.monotonic() < deadline:  # a dead rank's beat needs ~3 s to go stale
            time.sleep(0.25)
            silent = self.silent_ranks()
        if known:
            silent = sorted(set(silent or []) | set(known))
        if err and str(err):
            cause = f" ({type(err).__name__}: {str(err).splitlines()[0][:160]})"
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
    if isinstance(err, (TypeError, ValueError)):  # a refused tensor or bad input names no peer (comm.CommDeviceError)
        return False
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
    _stop_job(lambda: _active.failure_message(err), stream)


_reporting = threading.Lock()  # one line per rank, though the main and the beating thread may both see the failure


def _stop_job(message, stream=None) -> None:
    """Print message() and end this rank with exit code 1; a second caller waits for the first's exit."""
    if not _reporting.acquire(blocking=False):
        threading.Event().wait()  # the first reporter ends the process
    print(message(), file=stream or sys.stderr, flush=True)
    if _active is not None:
        _active.close(last=STOPPED)  # not silent: the watcher of this rank need not report it too
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
