"""What the tests share: the fp32 tolerance, token ids, rank pools (gloo ranks spawned once
per world size, serving many test bodies), and the demo model with its single-process truth."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from benchmarks.rank_group import RankGroup, free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPT = "The weather station on the island recorded"

# Logits of the tiny models are of unit-to-ten scale; fp32 reordering across ranks and chunks
# moves them by ~1e-6. 1e-4 is tight enough that any masking or cache bug (O(1e-1)) fails.
LOGITS_ATOL = 1e-4
# the engine's layouts, each held to the single-process model: (world, tiny model, run options)
ENGINE_LAYOUTS = [
    (1, "llama", {}),
    (1, "llama", dict(kv_dtype="int8")),
    (2, "llama", dict(ring=2)),
    (2, "llama", dict(ulysses=2)),
    (2, "llama", dict(tp=2)),
    (2, "llama4l", dict(pp=2)),
]


def layout_ids(layouts) -> list[str]:
    return [f"{n}-" + ("-".join(f"{k}{v}" for k, v in c.items()) or "world1") for _, n, c in layouts]


def ids(n, seed=0, vocab=96):
    """[1, n] random token ids, the same for a seed."""
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ---- rank pools ------------------------------------------------------------------------------
class RankPool(RankGroup):
    def run(self, fn, *args, timeout: float = 300.0, **kwargs) -> list:
        return super().run(fn, *args, timeout=timeout, **kwargs)


class Pools:
    """One live pool per world size for a test session; a broken pool is replaced."""

    def __init__(self):
        self._pools: dict[int, RankPool] = {}

    def __call__(self, world: int) -> RankPool:
        pool = self._pools.get(world)
        if pool is None or not pool.alive:
            pool = self._pools[world] = RankPool(world)
        return pool

    def close_world(self, world: int):
        """Free a big pool that later tests won't need."""
        pool = self._pools.pop(world, None)
        if pool is not None:
            pool.close()

    def close(self):
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


# ---- the demo model -------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def demo_folder() -> str:
    """SmolLM2-135M-Instruct as a safetensors folder with its tokenizer (converted once, then cached)."""
    from toolkit.models import _converted_gguf_folder, resolve_source

    return str(_converted_gguf_folder(resolve_source("smollm2-135m")))


@functools.lru_cache(maxsize=None)
def hf_greedy(prompt: str, new_tokens: int) -> tuple[int, ...]:
    """The truth every layout is held to: transformers' own greedy generate, one process, raw tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = demo_folder()
    ids = AutoTokenizer.from_pretrained(folder)(prompt, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tuple(out[0, ids.shape[1]:].tolist())


def one_error_line(result) -> str:
    """Assert a failure printed exactly one `Error:` line and no traceback; return it."""
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("lctk: ")]  # progress
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output and not result.stdout.strip()
    return lines[0]


# ---- real launches (subprocesses with a hard deadline) --------------------------------------
LAUNCH_DEADLINE_S = 420  # the first DeepSpeed start on a machine can JIT-build an op (~30 s); 2 cores are slow


def launch(cmd, timeout=LAUNCH_DEADLINE_S, **env):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **env}
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def only_json(stdout: str) -> dict:
    """The one JSON object on stdout; anything else there may only be the deepspeed launcher's log."""
    found = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(found) == 1, stdout
    stray = [line for line in stdout.splitlines() if line.strip() and not line.startswith(("{", "["))]
    assert not stray, stray
    return json.loads(found[0])


def deepspeed(*args):
    return [BIN / "deepspeed", "--master_port", free_port(), "--num_gpus", 2, "launch/run.py", *args]


def torchrun(*args):
    return [BIN / "torchrun", "--standalone", "--nproc_per_node", 2, "launch/run.py", *args]


def start_server(*args) -> dict:
    """`torchrun --nproc_per_node 2 launch/run.py serve ARGS` on a free port, once /health answers."""
    import pytest

    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "launch/run.py",
                             "serve", "--port", str(port), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return {"url": url, "proc": proc}
        except OSError:
            time.sleep(1)
    stop_all(proc)
    pytest.fail("the server did not come up in 300 s")


def stop_all(proc):
    """The launcher and its ranks: killing torchrun alone would leave the ranks running."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


# ---- cases shared by the session, decode, family and quantised-cache tests -------------------
DOC = ids(45, seed=3).tolist()[0]
QUESTIONS = [ids(20, seed=5).tolist()[0], ids(3, seed=6).tolist()[0]]  # 20 tokens > one 16-token chunk
MORE = QUESTIONS + [ids(7, seed=8).tolist()[0]]
SESSION_LAYOUTS = [
    (1, "llama", {}),
    (2, "llama", dict(ring=2)),
    (2, "llama", dict(ring=2, ring_mode="pass-q")),
    (2, "llama", dict(ulysses=2)),
    (4, "llama", dict(ulysses=2, ring=2)),
    (4, "llama", dict(tp=2, ring=2)),
    (2, "llama4l", dict(pp=2)),
    (3, "llama9", dict(ring=3, sequence_layout="contiguous")),
]

# tiny "llama": 4 heads, 2 KV heads, head_dim 16, fp32; "qwen2": 8 heads, 2 KV heads, head_dim 8
HEAD_DIMS = {"llama": (4, 2, 16), "qwen2": (8, 2, 8)}


def sent_by_layer(counts: dict, tags: tuple) -> dict:
    """{layer: bytes sent} summed over the given tags of a CommCounter's by_key."""
    out = {}
    for (tag, layer), (sent, _received) in counts.items():
        if tag in tags:
            out[layer] = out.get(layer, 0) + sent
    return out
