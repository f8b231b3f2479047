"""A 1,048,576-token prompt through ring attention on 4 CPU ranks (issue 7, item 2).

Micro model (1 layer, 2 heads, 1 KV head, head dim 16, random weights), ring=4, zigzag,
pass-KV, chunks of 32K tokens (the planner's 8K per rank), then a few greedy decode steps.
Smaller prompts run first; their times, fitted as a*N^2 + b*N, predict the full run, which
starts only if the prediction fits --budget-min. Records prefill and decode time, peak
memory per rank and the planner's prediction for the same run.

    python benchmarks/million_tokens.py                    # calibrate, then 1M if it fits
    python benchmarks/million_tokens.py --tokens 262144    # one size only
Writes benchmarks/out/million_tokens.json and million_tokens.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import MEASURE_ENV  # noqa: E402
from benchmarks.million import extrapolate, run_million  # noqa: E402
from benchmarks.models import random_folder  # noqa: E402
from benchmarks.rank_group import RankGroup  # noqa: E402
from benchmarks.suite import model_root  # noqa: E402

MILLION = 1 << 20


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["calibration"] + ([result["million"]] if result.get("million") else [])
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    xs = [r["tokens"] / 1024 for r in rows]
    a.plot(xs, [r["prefill_s"] for r in rows], "o-", label="measured prefill")
    if result.get("predicted_prefill_s"):
        a.plot([MILLION / 1024], [result["predicted_prefill_s"]], "x", ms=10, label="predicted (a N^2 + b N)")
    a.set_xlabel("prompt tokens (K)"), a.set_ylabel("seconds"), a.set_xscale("log"), a.set_yscale("log")
    a.set_title("ring=4 prefill, micro model"), a.legend(fontsize=8)
    b.plot(xs, [max(r["run_memory_mib_per_rank"]) for r in rows], "o-", label="measured (max rank)")
    b.plot(xs, [r["planner"]["memory_mib"] for r in rows], "s--", label="planner")
    b.plot(xs, [max(r["kv_cache_mib_per_rank"]) for r in rows], "^:", label="KV cache shard")
    b.set_xlabel("prompt tokens (K)"), b.set_ylabel("MiB per rank"), b.set_xscale("log")
    b.set_title("memory per rank above the runtime"), b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, help="run this one size only (no calibration, no budget check)")
    ap.add_argument("--calibrate", default="65536,131072,262144", help="sizes run first, comma-separated")
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--budget-min", type=float, default=60.0, help="start the 1M run only if predicted to fit")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = ap.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = random_folder("micro-1m", model_root())
    sizes = [args.tokens] if args.tokens else [int(x) for x in args.calibrate.split(",") if x]
    result = {"calibration": [], "million": None, "predicted_prefill_s": None, "status": ""}
    started = time.perf_counter()
    with RankGroup(args.world, threads=1, env=MEASURE_ENV) as ranks:
        for n in sizes:
            row = run_million(ranks, folder, n, args.decode_steps)
            print(f"{n:>9} tokens: prefill {row['prefill_s']:.1f} s, decode {row['decode_s']:.2f} s, run memory "
                  f"{max(row['run_memory_mib_per_rank']):.0f} MiB/rank (planner {row['planner']['memory_mib']:.0f})",
                  flush=True)
            if n == MILLION:
                result["million"] = row
            else:
                result["calibration"].append(row)
        if not args.tokens:
            predicted = extrapolate(result["calibration"], MILLION)
            result["predicted_prefill_s"] = predicted
            print(f"predicted 1M-token prefill: {predicted / 60:.1f} min (budget {args.budget_min:.0f} min)", flush=True)
            if predicted / 60 <= args.budget_min:
                result["million"] = run_million(ranks, folder, MILLION, args.decode_steps)
                r = result["million"]
                print(f"{MILLION} tokens: prefill {r['prefill_s']:.1f} s, decode {r['decode_s']:.2f} s, run memory "
                      f"{max(r['run_memory_mib_per_rank']):.0f} MiB/rank (planner {r['planner']['memory_mib']:.0f})")
            else:
                result["status"] = "1M run skipped: predicted time over the budget"
    result["status"] = result["status"] or ("1M run completed" if result["million"] else "calibration only")
    result["seconds"] = time.perf_counter() - started
    (out / "million_tokens.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot(result, out / "million_tokens.png")
    print(f"{result['status']}; wrote {out / 'million_tokens.json'}")


if __name__ == "__main__":
    main()
