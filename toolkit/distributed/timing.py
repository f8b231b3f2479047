"""The clock every reported time is read from (prefill_s, decode_s, tokens_per_s, load_s,
ttft_s, a pipeline stage's busy time): CUDA work is queued, so without a synchronise the
clock would stop when the host has launched the work, not when the device has done it.

Only durations the toolkit reports go through `clock` (tests/test_architecture.py holds
time.perf_counter to this module). Deadlines and polling (the watchdog) use
time.monotonic, and timestamps time.time: they wait for the host, not for the device.
"""
from __future__ import annotations

import time


def clock(device=None) -> float:
    """Seconds (an arbitrary origin) once `device` (a torch.device or its name) has finished the
    work queued on it so far; on the host (CPU, None) there is nothing to wait for. torch is
    imported only for a device: the CLI imports this module and starts without torch."""
    if device is not None and str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
    return time.perf_counter()
