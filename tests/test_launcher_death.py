"""A launcher killed with SIGKILL (the OOM killer, a scheduler) takes its ranks with it: a
served model under torchrun, whose ranks run in sessions of their own and ignore SIGTERM,
is gone within 10 s, and its port stops answering."""
import os
import signal
import time
import urllib.request

import psutil

from helpers import start_server, stop_all


def test_ranks_end_within_10_s_of_a_sigkilled_torchrun(tiny_dirs):
    started = start_server("--model", tiny_dirs("llama"), "--ring", 2, "--chunk-size", 16)
    proc = started["proc"]
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "run.py" in " ".join(p.cmdline())]
    try:
        assert len(ranks) == 2
        os.kill(proc.pid, signal.SIGKILL)  # the launcher alone, as the OOM killer would
        gone, alive = psutil.wait_procs(ranks, timeout=10)
        assert not alive, f"ranks still running 10 s after their launcher died: {[p.pid for p in alive]}"
        try:
            urllib.request.urlopen(f"{started['url']}/health", timeout=2)
            answered = True
        except OSError:
            answered = False
        assert not answered
    finally:
        stop_all(proc)
        for rank in ranks:  # orphans are no longer our children: kill them by pid, whatever happened
            try:
                rank.kill()
            except psutil.NoSuchProcess:
                pass
