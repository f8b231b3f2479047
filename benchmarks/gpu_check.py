"""The GPU check behind gpu_check.sh: one GPU, under 8 minutes, one table last.

Each step runs as its own process group with its own deadline (a hang fails that step, and
the next one starts); each row is a claim with its measured figure: pass, fail, info or skip.
The run exits 1 when any row fails. It writes out/gpu_check.json (out/gpu_check-dry.json for a
dry run, which never stands in for a GPU's figures: RESULTS.md renders the former only).

    python benchmarks/gpu_check.py [--dry-run] [--list] [--out DIR] [--started EPOCH]

This driver imports no torch: it starts the steps and reads what they wrote.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.gpu_rows import Rows, read_rows, run_child, tail  # noqa: E402

BUDGET_S = 460.0  # from the start of gpu_check.sh (wheels installed first) to the JSON written
DRY_BUDGET_S = 2400.0  # the same steps on a small CPU, small sizes
MIN_STEP_S = 20.0  # a step given less than this is not started (a failed row says why)


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: float  # on one H100; a step ends at its cap or the run's deadline, whichever is first
    kind: str  # "steps": gpu_steps.py STEP; "ranks": gpu_multirank.py under torchrun; "cli": gpu_cli.run_step
    proves: str


STEPS = [
    Step("device", 60, "steps", "versions (which transformers: carried or the image's), DeepSpeed imports, flash-attn "
         "or not, matmul and copy rates, our attention kernels and merge against float64 in fp32 and bf16"),
    Step("models", 60, "steps", "tiny random models with a word-level tokenizer, built here (nothing is downloaded)"),
    Step("world1", 150, "steps", "an NCCL group of one rank; every kv dtype (bf16, int8, fp8, int4) on the device: the "
         "CPU's tokens, distance from the model's-dtype cache; eager, static and CUDA-graph decode: equal tokens; bf16 "
         "graphs re-captured as the read span grows: the static step's tokens; window and soft-cap attention with no "
         "host sync; dynamic RoPE with --cuda-graph refused; a sliding-window model against transformers; "
         "DeepSpeed's TP layers at tp=1 on NCCL"),
    Step("cli", 240, "cli", "lctk ask under torchrun (1 rank, NCCL group): pre-flight, --json memory peaks, "
         "--save-cache then --cache; ask --tp 2 (DeepSpeed AutoTP, 2 ranks on the device over gloo); "
         "generate --cuda-graph"),
    Step("ranks2", 150, "ranks", "2 ranks on the device: AutoTP tp=2, Ulysses 2, ring 2 (pass-KV zigzag, pass-Q), "
         "a sliding window on ring 2, a wide Mixtral's largest allocation while loading at tp=2; the collectives audit"),
    Step("ranks4", 100, "ranks", "4 ranks on the device: Ulysses 2 x ring 2, ring 4, Ulysses 4, tp 2 x ring 2; audit"),
    Step("decode", 90, "steps", "8B-shaped bf16 decode from 8K cached tokens: eager, static, CUDA graph, transformers"),
    Step("prefill", 10_000, "steps", "8B-shaped bf16 prefill at 32K and 128K tokens, ours against transformers sdpa"),
]


def plan(dry: bool) -> str:
    budget = DRY_BUDGET_S if dry else BUDGET_S
    lines = [f"gpu_check plan ({'dry run on CPU, small sizes' if dry else 'one CUDA device'}; "
             f"{budget:.0f} s in all, each step within its cap and what is left):"]
    for step in STEPS:
        cap_s = step.cap_s * (4 if dry else 1)
        cap = "rest" if cap_s >= budget else f"{cap_s:.0f} s"
        lines.append(f"  {step.name:<8} {cap:>6}  {step.proves}")
    return "\n".join(lines)


def run_step(step: Step, rows_file: Path, work: Path, seconds: float, dry: bool, env: dict):
    log = work / f"{step.name}.log"
    if step.kind == "cli":
        from benchmarks import gpu_cli

        end = time.monotonic() + seconds
        found = [r for r in read_rows(rows_file) if r["check"] == "API eager tokens of the CLI's prompt"]
        models = {name: str(work / name) for name in ("chat-llama",)}
        with Rows(rows_file, "cli").guard("cli step"):
            gpu_cli.run_step(Rows(rows_file, "cli"), models, work / "cli", lambda: end - time.monotonic(), dry,
                             found[0]["tokens"] if found else None)
        return 0
    flags = ["--rows", str(rows_file), "--root", str(work)] + (["--dry-run"] if dry else [])
    if step.kind == "ranks":
        world = step.name[-1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(HERE / "gpu_multirank.py"), *flags]
    else:
        cmd = [sys.executable, str(HERE / "gpu_steps.py"), step.name, *flags, "--seconds", f"{seconds:.0f}"]
    code, _ = run_child(cmd, seconds, log, env=env, cwd=HERE.parent)
    rows = Rows(rows_file, step.name)
    if code is None:
        rows.add(f"{step.name} step", "fail", f"timed out after {seconds:.0f} s; last words: {tail(log)}")
    elif code != 0:
        rows.add(f"{step.name} step", "fail", f"exit code {code}: {tail(log)}")
    return code


def table(result: dict) -> str:
    counts = ", ".join(f"{result['counts'][s]} {s}" for s in ("pass", "fail", "info", "skip"))
    lines = [f"GPU check on {result['device']}: {result['seconds']:.0f} s, {counts}"]
    for row in result["rows"]:
        if row["check"] == "API eager tokens of the CLI's prompt":
            continue
        lines.append(f"{row['status'].upper():<5} {row['step']:<8} {row['check']}: {row['figure']}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, small sizes: checks the script, not a GPU")
    ap.add_argument("--list", action="store_true", help="print the steps and their budgets, run nothing")
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--started", type=float, help="epoch seconds when gpu_check.sh started (the budget counts "
                                                  "from then)")
    args = ap.parse_args()
    if args.list:
        print(plan(args.dry_run))
        return
    t0 = time.time()
    deadline = (args.started or t0) + (DRY_BUDGET_S if args.dry_run else BUDGET_S)
    out = Path(args.out).resolve()
    work = out / ("gpu-dry" if args.dry_run else "gpu")
    work.mkdir(parents=True, exist_ok=True)
    rows_file = work / "rows.jsonl"
    rows_file.unlink(missing_ok=True)
    # a dry run keeps to the CPU even where there is a GPU; every child gets the repo on its path
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo",
           **({"CUDA_VISIBLE_DEVICES": ""} if args.dry_run else {})}
    os.environ.update(env)
    steps = []
    for step in STEPS:
        left = deadline - time.time() - 5
        if left < MIN_STEP_S:
            Rows(rows_file, step.name).add(f"{step.name} step", "fail", f"not run: {left:.0f} s left of the budget")
            continue
        seconds = min(step.cap_s * (4 if args.dry_run else 1), left)
        print(f"[gpu_check] {step.name}: up to {seconds:.0f} s", flush=True)
        started = time.time()
        code = run_step(step, rows_file, work, seconds, args.dry_run, env)
        steps.append({"step": step.name, "seconds": time.time() - started, "limit_s": seconds, "exit": code})
    rows = read_rows(rows_file)
    device = next((r["figure"].split(";")[0] for r in rows if r["check"] == "device"), "an unknown device")
    dry = args.dry_run or device.startswith("CPU")  # run directly, without gpu_check.sh's refusal
    if dry and not args.dry_run:
        Rows(rows_file, "device").add("a CUDA device", "fail", "none: these rows ran on the CPU, as a dry run would")
        rows = read_rows(rows_file)
    result = {"device": device, "dry_run": dry, "seconds": time.time() - (args.started or t0), "steps": steps,
              "rows": rows, "counts": {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "info", "skip")}}
    result["table"] = table(result)
    target = out / ("gpu_check-dry.json" if dry else "gpu_check.json")
    target.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"\n[gpu_check] wrote {target}; logs in {work}\n\n{result['table']}", flush=True)
    sys.exit(1 if result["counts"]["fail"] else 0)


if __name__ == "__main__":
    main()
