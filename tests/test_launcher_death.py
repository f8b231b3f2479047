"""A launcher killed with SIGKILL (the OOM killer, a scheduler) takes its ranks with it: a
served model, whose ranks run in sessions of their own and ignore SIGTERM, is gone within
10 s under torchrun and under the deepspeed launcher, and its port stops answering."""
import os
import signal
import subprocess
import time
import urllib.request

import psutil
import pytest

from helpers import BIN, REPO, deepspeed, free_port, torchrun


def _serve(launcher, model: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = launcher("serve", "--port", port, "--model", model, "--ring", 2, "--chunk-size", 16)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(1)
    raise AssertionError("the server did not come up")


@pytest.mark.parametrize("launcher", [torchrun, deepspeed], ids=["torchrun", "deepspeed"])
def test_ranks_end_within_10_s_of_a_sigkilled_launcher(tiny_dirs, launcher):
    proc, url = _serve(launcher, tiny_dirs("llama"))
    tree = psutil.Process(proc.pid).children(recursive=True)
    ranks = [p for p in tree if "run.py" in " ".join(p.cmdline()) and "deepspeed.launcher" not in " ".join(p.cmdline())]
    try:
        assert len(ranks) == 2
        os.kill(proc.pid, signal.SIGKILL)  # the launcher alone, as the OOM killer would
        _, alive = psutil.wait_procs(ranks, timeout=10)
        assert not alive, f"ranks still running 10 s after their launcher died: {[p.pid for p in alive]}"
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            answered = True
        except OSError:
            answered = False
        assert not answered
    finally:
        for p in [proc, *tree]:  # orphans are no longer our children: by pid, whatever happened
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
