"""Rows of the GPU check and the steps that make them.

A row is one claim with its measured figure: `pass`, `fail`, `info` (a fact, such as "flash-attn:
not installed") or `skip` (a figure not measured, and why). Each step appends its rows to a
JSON-lines file as it goes, so a step killed at its deadline still leaves what it had found.
Steps run as child processes (their own session): a hang in one fails that step, not the run.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import traceback
from pathlib import Path

STATUSES = ("pass", "fail", "info", "skip")


def one_line(err: BaseException) -> str:
    """The last line of an exception's text (what a person reads first), with its type."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:300]


class Rows:
    """Append rows of one step to `path` (JSON lines), flushed one by one."""

    def __init__(self, path, step: str):
        self.path, self.step = Path(path), step
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, check: str, status, figure: str = "", **detail) -> bool:
        if isinstance(status, bool):
            status = "pass" if status else "fail"
        assert status in STATUSES, status
        row = {"step": self.step, "check": check, "status": status, "figure": figure, **detail}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, default=str) + "\n")
        print(f"[gpu_check] {status:<4} {check}: {figure}", flush=True)
        return status == "pass"

    @contextlib.contextmanager
    def guard(self, check: str):
        """Run a block that makes its own rows; an exception becomes one failed row `check`."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - a failed check is a row, the next check still runs
            traceback.print_exc()
            self.add(check, "fail", one_line(err))


def read_rows(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_child(cmd: list[str], timeout: float, log, env: dict | None = None, cwd=None,
              stdout=None) -> tuple[int | None, float]:
    """cmd in its own session, stderr (and stdout, unless a `stdout` path is given) to `log` ->
    (exit code or None on timeout, seconds). On timeout, and once it exits, whatever is left of
    its session (a launcher's ranks) gets SIGTERM, then SIGKILL."""
    t0 = time.monotonic()
    with open(log, "ab") as out, open(stdout or os.devnull, "wb") as std:
        proc = subprocess.Popen(cmd, stdout=std if stdout else out, stderr=out, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            code = None
        finally:
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)  # the child's own session: its ranks too, nothing else
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=wait)
                    if sig == signal.SIGTERM and code is not None:
                        break
    return code, time.monotonic() - t0


# torchrun's closing report of a failed rank: not the error, which comes before it
_BOILERPLATE = ("torch.distributed.elastic", "ChildFailedError", "error_file", "To enable traceback", "traceback :",
                "exitcode", "time      :", "host      :", "rank      :", "local_rank", "Failures:", "Root Cause",
                "<NO_OTHER_FAILURES>", "warnings.warn", "FutureWarning", "UserWarning", "[W")


def tail(log) -> str:
    """The line of a child's log that says why it failed: the last error-like line that is not
    the launcher's report, else the last line."""
    try:
        lines = Path(log).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    lines = [line.strip() for line in lines
             if line.strip().strip("=-") and not any(b in line for b in _BOILERPLATE)]
    for line in reversed(lines):
        if "Error" in line or "error:" in line or line.startswith(("lctk:", "gpu_")):
            return line[:300]
    return lines[-1][:300] if lines else ""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
