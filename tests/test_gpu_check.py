"""The GPU check tells the truth on a machine without a GPU: it refuses in one line, plans its
steps when asked, and its pieces (the collectives audit, the step runner, the JSON a dry run
writes) do what the check's rows rely on. The check itself runs on a GPU machine
(README, "Running on GPUs"); its dry run takes minutes on CPU and is not part of the suite."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, gpu_multirank, results
from benchmarks.gpu_rows import Rows, read_rows, run_child, tail

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _script(*args, env=None):
    env = {k: v for k, v in os.environ.items() if k != "PY"} | (env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: the check would run")
def test_without_a_cuda_device_the_check_refuses_in_one_line(tmp_path):
    done = _script("--out", str(tmp_path))
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode != 0
    assert len(lines) == 1, lines
    assert "no CUDA device" in lines[0] and "--dry-run" in lines[0]
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


@pytest.mark.parametrize("flags", [["--list"], ["--dry-run", "--list"]])
def test_list_plans_every_step_and_runs_nothing(tmp_path, flags):
    done = _script(*flags, "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert ("dry run" in lines[0]) == ("--dry-run" in flags)
    planned = [line.split()[0] for line in lines[1:]]
    assert planned == [step.name for step in gpu_check.STEPS]
    assert planned == ["device", "models", "world1", "cli", "ranks2", "ranks4", "decode", "prefill"]
    assert not list(tmp_path.iterdir())


def test_the_steps_fit_the_eight_minutes_with_room_for_prefill():
    fixed = sum(step.cap_s for step in gpu_check.STEPS if step.name != "prefill")
    backstop = int(re.search(r"else BACKSTOP_S=(\d+)", SCRIPT.read_text()).group(1))
    assert gpu_check.BUDGET_S + 10 <= backstop <= 8 * 60  # the driver ends first; the backstop within 8 minutes
    assert fixed > gpu_check.BUDGET_S  # caps are ceilings: a hang ends its step, the rest share what is left
    assert all(step.kind in ("steps", "ranks", "cli") for step in gpu_check.STEPS)


def test_audit_flags_a_host_tensor_only_on_a_group_meant_to_be_nccl(monkeypatch):
    audit = object.__new__(gpu_multirank.Audit)
    monkeypatch.setattr(gpu_multirank, "_caller", lambda: "toolkit/api.py:1 memory_peaks")
    host, meta = torch.zeros(2, dtype=torch.float64), torch.zeros(2, device="meta")
    for asked, tensor, flagged in [("nccl", host, True), ("cpu:gloo,cuda:nccl", host, False), ("gloo", host, False),
                                   ("nccl", meta, False)]:
        audit.asked, audit.calls, audit.findings = {"world": asked}, 0, {}
        audit.see("all_reduce", (tensor,), {"group": None}, torch)
        assert audit.calls == 1
        assert bool(audit.findings) == flagged, (asked, tensor.device)
        if flagged:
            assert audit.findings == {"toolkit/api.py:1 memory_peaks": "all_reduce of a host tensor on a group asked "
                                                                       "to be nccl"}
    assert gpu_multirank._as_gloo("nccl") == "gloo" and gpu_multirank._as_gloo("cpu:gloo,cuda:nccl") == "cpu:gloo,cuda:gloo"


def test_a_hung_step_is_killed_at_its_deadline_with_its_children(tmp_path):
    log = tmp_path / "hang.log"
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
            "print('about to hang', flush=True); time.sleep(60)"
    t0 = time.monotonic()
    code, seconds = run_child([sys.executable, "-c", child], 2.0, log)
    assert code is None and seconds < 15 and time.monotonic() - t0 < 15
    assert tail(log) == "about to hang"
    code, _ = run_child([sys.executable, "-c", "raise ValueError('bad input')"], 30.0, log)
    assert code == 1 and tail(log) == "ValueError: bad input"


def test_a_failed_check_is_a_row_and_the_next_one_runs(tmp_path):
    rows = Rows(tmp_path / "rows.jsonl", "world1")
    with rows.guard("kv dtypes"):
        raise RuntimeError("a long story\nthe last line")
    rows.add("decode modes", True, "3 modes")
    rows.add("flash-attn", "info", "not installed")
    found = read_rows(tmp_path / "rows.jsonl")
    assert [(r["check"], r["status"]) for r in found] == [("kv dtypes", "fail"), ("decode modes", "pass"),
                                                          ("flash-attn", "info")]
    assert found[0]["figure"] == "RuntimeError: the last line"


def test_a_dry_run_never_stands_in_for_a_gpu_in_results():
    rows = [{"step": "device", "check": "device", "status": "info", "figure": "CPU (dry run)"},
            {"step": "world1", "check": "decode modes", "status": "pass", "figure": "equal"}]
    result = {"device": "CPU (dry run)", "seconds": 1.0, "rows": rows,
              "counts": {"pass": 1, "fail": 0, "info": 1, "skip": 0}}
    result["table"] = gpu_check.table(result)
    assert result["table"].splitlines()[0] == "GPU check on CPU (dry run): 1 s, 1 pass, 0 fail, 1 info, 0 skip"
    bench = {"metrics": {}, "mode": "quick", "seconds": 1.0, "machine": {}}
    assert "PASS  world1   decode modes: equal" not in results.block(bench, gpu=dict(result, dry_run=True))
    assert "PASS  world1   decode modes: equal" in results.block(bench, gpu=dict(result, dry_run=False))


def test_prepare_refuses_in_one_line_without_its_python_and_its_wheels_are_ignored_by_git():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_prepare.sh")], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "PY": str(ROOT / "no-such-python")})
    assert done.returncode != 0
    assert [line for line in done.stderr.splitlines() if line.strip()] == \
        [f"gpu_prepare: no Python at {ROOT / 'no-such-python'}: run 'make test' once (it builds .venv), or set PY"]
    ignored = subprocess.run(["git", "check-ignore", ".whl/deepspeed-0.19.8-py3-none-any.whl"], cwd=ROOT,
                             capture_output=True, text=True)
    assert ignored.returncode == 0
