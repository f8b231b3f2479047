"""Measuring on a noisy, shared machine: interleaved repeats, medians of paired ratios,
peak resident memory, the matmul ceiling, and fresh processes for peaks that must not mix.

Every timed figure in the benchmarks is a ratio of two things measured here in the same
run, alternating, so that other load on the machine slows both alike (ARCHITECTURE.md, Tests and benchmarks).
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import queue
import re
import statistics
import threading
import time
import traceback
from typing import Callable

from .rank_group import environment

KIB = 1024
MIB = 1024 ** 2


def median(values) -> float:
    return float(statistics.median(values))


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of a_i / b_i over runs made next to each other (drift cancels pair by pair)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("paired_ratio needs two equally long, non-empty lists")
    return median([a / b for a, b in zip(numerator, denominator)])


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """Wrap fn so that calling it returns its wall time in seconds."""
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def interleave(runs: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Call every run `repeats` times, alternating ABAB.. then BABA.., each returning its own seconds.

    Alternating the order means a slow stretch of the machine lands on both sides; warm-up
    calls (first-touch allocations, kernel selection) are not recorded.
    """
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            seconds[name].append(float(runs[name]()))
    return seconds


# ---- memory ------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            found = re.search(rf"^{field}:\s+(\d+)\s+kB", handle.read(), re.MULTILINE)
        return int(found.group(1)) if found else None
    except OSError:
        return None


def rss_bytes() -> int:
    """Resident set size of this process now."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * KIB
    import psutil

    return psutil.Process().memory_info().rss


def _reset_high_water_mark() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory while the block runs, above the resident memory when it began.

    Exact on Linux (the kernel's own high-water mark, reset on entry); elsewhere a thread
    samples RSS every millisecond, which can miss a short spike (`exact` says which).
    """

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.base = rss_bytes()
        self.exact = _reset_high_water_mark()
        self._stop = threading.Event()
        self._sampled = self.base
        if not self.exact:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._sampled = max(self._sampled, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.exact:
            self.peak = _status_kib("VmHWM") * KIB
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._sampled, rss_bytes())
        self.delta = self.peak - self.base
        return False

    def to_dict(self) -> dict:
        return {"base_mib": self.base / MIB, "peak_mib": self.peak / MIB, "delta_mib": self.delta / MIB,
                "method": "VmHWM reset via /proc/self/clear_refs" if self.exact else "RSS sampled every 1 ms"}


# ---- compute ceiling -----------------------------------------------------------------------
def matmul_rate(dtype=None, n: int = 2048, repeats: int = 3, device: str = "cpu") -> float:
    """Best FLOP/s of an n x n x n matmul over `repeats` tries: the machine's practical ceiling."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2.0 * n ** 3 / (time.perf_counter() - t0))
    return best


def copy_bandwidth(device="cpu", mib: int = 1024, repeats: int = 5) -> float:
    """Bytes read + written per second by dst.copy_(src), best of `repeats`: the memory bandwidth.
    On a CPU, src and dst must outgrow the last-level cache (hundreds of MiB on server chips)."""
    import torch

    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    src = torch.empty(mib * MIB // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = max(best, 2 * src.numel() * 4 / (time.perf_counter() - t0))
    return best


# ---- fresh processes -------------------------------------------------------------------------
def _child(fn, args, kwargs, threads, results):
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        results.put((True, fn(*args, **kwargs)))
    except BaseException:  # noqa: BLE001 - the parent re-raises with this traceback
        results.put((False, traceback.format_exc()))


# glibc raises its mmap threshold each time a large block is freed, after which blocks of
# that size come from the heap and freed ones stay resident: RSS then grows with the number
# of allocations, not with what is live. A fixed threshold (which also turns the dynamic
# adjustment off) sends every block >= 1 MiB to mmap and back to the OS on free, so peak
# RSS measures what the program holds. Measured: the same chunked prefill shows 97 -> 110
# MiB of "activations" from 8K to 64K tokens without it, 59.4 -> 59.7 MiB with it.
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def in_fresh_process(fn, *args, threads: int | None = None, timeout: float = 1800.0, env: dict | None = None,
                     **kwargs):
    """fn(*args, **kwargs) in a new interpreter (spawn) -> its picklable result; torch uses
    `threads` threads there (None: torch is not even imported unless fn imports it); `env`
    is in its environment from the start (allocator settings must be).

    Used wherever a peak must not include another run's allocations: each gets a process
    that has seen nothing else. fn must be importable (module level).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, kwargs, threads, results), daemon=True)
    with environment(env):
        proc.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                ok, value = results.get(timeout=1.0)
                break
            except queue.Empty:
                if not proc.is_alive() and results.empty():
                    raise RuntimeError(f"{fn.__name__} died in its process (exit code {proc.exitcode})") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} took longer than {timeout:.0f} s") from None
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    if not ok:
        raise RuntimeError(f"{fn.__name__} failed in its process:\n{value}")
    return value
