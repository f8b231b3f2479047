"""A rank SIGKILLed mid-prefill brings the whole job down fast, naming the dead rank,
with a non-zero exit and no partial output (real launchers, real processes)."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import BIN, free_port

ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 45  # heartbeat staleness (3.5 s) + launcher teardown, far below the 60 s collective timeout


def _launch(launcher: str, world: int, model_dir: str, work: Path):
    script = str(ROOT / "tests" / "scripts" / "long_prefill.py")
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(world), "--master_port", str(free_port()), script]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(world), "--master_port", str(free_port()), script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd + [model_dir, str(work), "6000"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout: float, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"job ended early (rc={proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the job never reached the point where the test kills a rank")


@pytest.mark.parametrize("launcher,world,victim", [("torchrun", 2, 1), ("deepspeed", 3, 1)])
def test_killed_rank_ends_the_job_quickly_with_its_name(tiny_dirs, tmp_path, launcher, world, victim):
    proc = _launch(launcher, world, tiny_dirs("llama"), tmp_path)
    progress = tmp_path / "progress"
    _wait_for(lambda: progress.exists() and int(progress.read_text().split("/")[0] or 0) >= 3, 240, proc)
    os.kill(int((tmp_path / f"pid.{victim}").read_text()), signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        _out, err = proc.communicate(timeout=BOUND_S + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the job hung after a rank died")
    elapsed = time.monotonic() - killed_at
    assert proc.returncode != 0
    assert elapsed < BOUND_S, f"took {elapsed:.1f}s to stop"
    assert f"stopping because rank {victim} stopped responding" in err, err[-3000:]
    assert not (tmp_path / "result.json").exists()
    assert not list(tmp_path.glob(".result.json.*")), "no temp file left behind"
