"""`lctk bench`: every benchmark of the suite, sized for --quick (about 12 minutes on 2 CPU
cores) or the full run, into one {"metrics": ..., "runs": ...} object plus a plot."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from . import report
from .report import print_table  # noqa: F401 - the table `lctk bench` prints

DEFAULT_CHUNK = 4096  # the prefill chunk the suite's figures are measured with

# name -> sizes for (quick, full)
SIZES = {
    "prefill_speed": ({"tokens": 2048, "repeats": 3}, {"tokens": 8192, "repeats": 5}),
    # quick: SmolLM2's widths with 8 of its 30 layers; full: the demo model itself
    "prefill_memory": ({"tokens": 16384, "model": "smollm2-8l"}, {"tokens": 16384, "model": "demo"}),
    "sp2": ({"tokens": 8192, "repeats": 3}, {"tokens": 16384, "repeats": 5}),
    "deepspeed": ({"tokens": 8192, "repeats": 5}, {"tokens": 16384, "repeats": 7}),
    "imbalance": ({"tokens": 131072}, {"tokens": 131072}),
    "chunked_memory": ({"lengths": [8192, 65536]}, {"lengths": [8192, 16384, 32768, 65536]}),
    "needle": ({"lengths": [1024, 2048], "depths": [0.2, 0.5, 0.8]},
               {"lengths": [1024, 2048, 4096, 8000], "depths": [0.1, 0.35, 0.65, 0.9]}),
    # a random Llama of ~0.8 GB fp32 on fresh ranks: tp=4, pp=2, tp=2 x pp=2
    "loading": ({"layers": 12, "repeats": 1}, {"layers": 12, "repeats": 3}),
    # demo model, ring=2, an ~8K-token document (the model's context is 8192)
    "sessions": ({"tokens": 7800, "repeats": 2}, {"tokens": 7800, "repeats": 3}),
    # demo model, one rank behind `lctk serve`; a 4K-token shared document for the cached TTFT
    "batching": ({"long_tokens": 4096}, {"long_tokens": 8000}),
    "serve": ({"repeats": 3, "document_tokens": 4096}, {"repeats": 5, "document_tokens": 4096}),
    # world 1 vs transformers (demo model) at each length; tp=2 / ring=2 (decode-bench) at one;
    # 8 questions after one document (demo model), batch vs one by one
    "decode": ({"lengths": [4096, 16384], "steps": 12, "repeats": 3, "layout_tokens": 4096, "doc_tokens": 1024,
                "questions": 8, "new_tokens": 32, "batch_repeats": 1},
               {"lengths": [1024, 2048, 4096, 8192, 16384], "steps": 24, "repeats": 5, "layout_tokens": 4096,
                "doc_tokens": 4096, "questions": 8, "new_tokens": 48, "batch_repeats": 3}),
    # one-layer Gemma 3 (local vs global layer), ring=2, Gemma 3's window of 1024
    "swa": ({"tokens": 32768, "window": 1024, "chunk": 4096}, {"tokens": 32768, "window": 1024, "chunk": 4096}),
    # the demo model with its cache in each kv dtype: needle prompts, KL over a real text, bytes
    "kv_dtypes": ({"lengths": [2048], "depths": [0.5], "prefix": 1024, "positions": 96,
                   "chunk": 4096, "wire_tokens": 2048, "wire_chunk": 256},
                  {"lengths": [2048, 4096, 8000], "depths": [0.1, 0.35, 0.65, 0.9], "prefix": 4096,
                   "positions": 300, "chunk": 4096, "wire_tokens": 8000, "wire_chunk": 1024}),
    # the demo model after a ~4K-token document: quoting answers and a summary, a story; world 1 and ring=2
    "speculation": ({"doc_tokens": 4096, "new": 96, "repeats": 2}, {"doc_tokens": 4096, "new": 96, "repeats": 3}),
    # the demo model's linears with a decode step's rows, a batch's, a prefill chunk's, and its decode
    # after a ~4K-token document, world 1
    "linear": ({"rows": [1, 2, 5, 6, 9, 16], "doc_tokens": 4096, "new": 40, "repeats": 3},
               {"rows": [1, 2, 5, 6, 9, 16, 64, 512], "doc_tokens": 4096, "new": 40, "repeats": 5}),
    # the demo model: short chats on ring=2 and on ring=4 against independent
    # one-rank processes; prompts alone at each length, at the chosen degree, on 1 rank and on 2
    "elastic": ({"lengths": [512, 2048], "long_tokens": 4096}, {"lengths": [512, 2048, 8000], "long_tokens": 8000}),
}
BENCHES = tuple(SIZES)
NEEDS_RANKS = ("sp2", "deepspeed", "needle", "sessions", "batching", "decode", "swa", "kv_dtypes", "speculation",
               "elastic")


def model_root() -> Path:
    from toolkit.settings import cache_root

    return cache_root() / "bench-models"


def machine() -> dict:
    import torch

    return {"host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.is_available(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _log(message: str, quiet: bool):
    if not quiet:
        print(f"[lctk bench] {message}", file=sys.stderr, flush=True)


def run_suite(quick: bool = True, only=None, threads: int | None = None, quiet: bool = False) -> dict:
    """Run the chosen benchmarks; -> {"metrics", "runs", "mode", "machine", "seconds", "errors"}."""
    from . import (batching, decode, deepspeed_peer, elastic, kv_dtypes, linear, loading, memory, needle, parallel,
                   prefill, serve, sessions, speculation, windows)
    from .models import demo_folder, random_folder
    from .rank_group import RankGroup

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    chosen = [b for b in BENCHES if not only or b in only]
    unknown = sorted(set(only or ()) - set(BENCHES))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    threads = threads or os.cpu_count() or 1
    size = {name: SIZES[name][0 if quick else 1] for name in BENCHES}
    root = model_root()
    metrics: dict = {}
    runs: list = []
    errors: dict = {}
    started = time.perf_counter()
    ranks = None

    def model(name: str) -> str:
        return demo_folder() if name == "demo" else random_folder(name, root)

    def step(name: str, fn):
        nonlocal ranks
        t0 = time.perf_counter()
        _log(f"{name} ...", quiet)
        try:
            got_metrics, got_runs = fn()
        except Exception as err:  # noqa: BLE001 - one failed benchmark must not hide the others
            errors[name] = f"{type(err).__name__}: {err}"
            _log(f"{name} FAILED: {errors[name].splitlines()[0]}", quiet)
            if ranks is not None and not ranks.alive:  # a failed call closes the group: the next get a fresh one
                ranks = RankGroup(2, threads=max(1, threads // 2))
            return
        metrics.update(got_metrics)
        for run in got_runs:
            run["elapsed_s"] = time.perf_counter() - t0
        runs.extend(got_runs)
        shown = ", ".join(f"{k}={v:.3f}" for k, v in got_metrics.items())
        _log(f"{name}: {shown} ({time.perf_counter() - t0:.0f} s)", quiet)

    try:
        if any(b in chosen for b in NEEDS_RANKS):
            ranks = RankGroup(2, threads=max(1, threads // 2))
        if "imbalance" in chosen:
            step("imbalance", lambda: parallel.imbalance(size["imbalance"]["tokens"]))
        if "prefill_speed" in chosen:
            s = size["prefill_speed"]
            step("prefill_speed", lambda: prefill.speed_vs_hf(model("demo"), s["tokens"], DEFAULT_CHUNK, s["repeats"],
                                                              threads, "SmolLM2-135M-Instruct"))
        if "prefill_memory" in chosen:
            s = size["prefill_memory"]
            label = "SmolLM2-135M-Instruct" if s["model"] == "demo" else f"{s['model']} (random weights)"
            step("prefill_memory", lambda: prefill.memory_vs_hf(model(s["model"]), s["tokens"], DEFAULT_CHUNK,
                                                                threads, label))
        if "sp2" in chosen:
            s = size["sp2"]
            step("sp2", lambda: parallel.sp2_efficiency(ranks, model("sp-bench"), s["tokens"], DEFAULT_CHUNK,
                                                        s["repeats"], threads, "sp-bench (random weights)"))
        if "deepspeed" in chosen:
            from .models import SHAPES

            s, shape = size["deepspeed"], SHAPES["sp-bench"]
            step("deepspeed", lambda: deepspeed_peer.ulysses_vs_deepspeed(
                ranks, s["tokens"], shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"],
                s["repeats"]))
        if "chunked_memory" in chosen:
            s = size["chunked_memory"]
            step("chunked_memory", lambda: memory.chunked_growth(model("mem-tiny"), s["lengths"], DEFAULT_CHUNK,
                                                                 threads, "mem-tiny (random weights)"))
        if "needle" in chosen:
            s = size["needle"]
            step("needle", lambda: needle.needle(ranks, model("demo"), s["lengths"], s["depths"], threads))
        if "sessions" in chosen:
            s = size["sessions"]
            step("sessions", lambda: sessions.sessions(ranks, model("demo"), s["tokens"], s["repeats"]))
        if "batching" in chosen:
            s = size["batching"]
            step("batching", lambda: batching.batching(ranks, model("demo"), threads, s["long_tokens"]))
        if "serve" in chosen:
            s = size["serve"]
            step("serve", lambda: serve.serve_figures(model("demo"), threads, s["repeats"], s["document_tokens"]))
        if "decode" in chosen:
            s = size["decode"]
            step("decode", lambda: decode.suite(ranks, model("demo"), model("decode-bench"), s, threads))
        if "swa" in chosen:
            s = size["swa"]
            step("swa", lambda: windows.swa_work(ranks, root, s["tokens"], s["window"], s["chunk"]))
        if "kv_dtypes" in chosen:
            step("kv_dtypes", lambda: kv_dtypes.kv_dtypes(ranks, model("demo"), size["kv_dtypes"], threads))
        if "speculation" in chosen:
            s = size["speculation"]
            step("speculation", lambda: speculation.speculation(ranks, model("demo"), threads, s["doc_tokens"], s["new"],
                                                                s["repeats"]))
        if "linear" in chosen:
            s = size["linear"]
            step("linear", lambda: linear.linear(model("demo"), threads, s["rows"], s["doc_tokens"], s["new"],
                                                 s["repeats"]))
        if "elastic" in chosen:
            s = size["elastic"]
            step("elastic", lambda: elastic.elastic(ranks, model("demo"), threads, s["lengths"], s["long_tokens"]))
        if "loading" in chosen:
            s = size["loading"]
            step("loading", lambda: loading.loading(root, s["layers"], s["repeats"]))
    finally:
        if ranks is not None:
            ranks.close()
    return {"metrics": metrics, "runs": runs, "mode": "quick" if quick else "full", "threads": threads,
            "machine": machine(), "seconds": time.perf_counter() - started, "errors": errors,
            "verdicts": {name: report.verdict(name, metrics) for name in report.TARGETS}}


def merge_rerun(old: dict, new: dict, names: list[str]) -> dict:
    """A run of some benchmarks (`names`) folded into an earlier run of the suite: their
    metrics, runs and errors replace the old ones; the rest stays; the rerun is recorded."""
    if old["mode"] != new["mode"]:
        raise ValueError(f"cannot fold a {new['mode']} rerun into a {old['mode']} run: use the same sizes")
    replaced = {run["bench"] for run in new["runs"]}
    merged = dict(old, metrics={**old["metrics"], **new["metrics"]},
                  runs=[r for r in old["runs"] if r["bench"] not in replaced] + new["runs"],
                  errors={**{k: v for k, v in old["errors"].items() if k not in names}, **new["errors"]})
    merged["verdicts"] = {name: report.verdict(name, merged["metrics"]) for name in report.TARGETS}
    merged["reruns"] = old.get("reruns", []) + [{"benchmarks": names, "machine": new["machine"],
                                                 "seconds": new["seconds"]}]
    return merged


def write_outputs(result: dict, out_dir) -> dict:
    """bench.json (or bench-quick.json) and its plot under out_dir -> {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench" if result["mode"] == "full" else "bench-quick"
    json_path = out / f"{stem}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(json_path)
    paths = {"json": str(json_path)}
    plot = report.plot_summary(result, out / f"{stem}.png")
    if plot:
        paths["plot"] = plot
    return paths
