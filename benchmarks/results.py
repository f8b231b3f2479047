"""The measured part of benchmarks/RESULTS.md, from the JSON files a run leaves in benchmarks/out/.

Only tables go between the markers: figures, targets, verdicts, machine, date, command.
What they mean and what limits them is hand-written in RESULTS.md around the markers and
kept byte for byte when the block is rewritten.
"""
from __future__ import annotations

import json
from pathlib import Path
from statistics import median_high

from . import report

COMMAND = "python benchmarks/run_all.py"
START_TAG = "<!-- measured:start"
START = START_TAG + ": written by `python benchmarks/run_all.py`; edit outside these markers -->"
END = "<!-- measured:end -->"
YES = {True: "yes", False: "no"}


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _runs(result: dict, bench: str) -> list:
    return [r for r in result.get("runs", []) if r.get("bench", "").startswith(bench)]


def _table(header: str, rows: list[list]) -> list[str]:
    """A markdown table; header: the column names joined by ' | '. No rows, no table."""
    if not rows:
        return []
    body = ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return [f"| {header} |", "|" + "---|" * (header.count(" | ") + 1)] + body + [""]


def _provenance(bench: dict, command: str) -> list[str]:
    def row(what, mc, seconds):
        return [what, mc.get("date", "?"), mc.get("cpu_count", "?"), mc.get("torch", "?"), YES[bool(mc.get("cuda"))],
                f"{seconds / 60:.0f}"]

    rows = [row(f"`{command}` ({bench['mode']} suite)", bench.get("machine", {}), bench["seconds"])]
    rows += [row(f"`{command} --only {' --only '.join(r['benchmarks'])}`", r["machine"], r["seconds"])
             for r in bench.get("reruns", [])]
    return _table("run | date | CPU cores | torch | GPU | minutes", rows)


def _prefill(bench: dict) -> list[str]:
    speed = _table("model | tokens | chunk | threads | repeats | transformers tokens/s | lctk tokens/s | MFU lctk | "
                   "MFU transformers | fp32 matmul GFLOP/s (median) | largest logit difference",
                   [[r["model"], r["tokens"], r["chunk_size"], r["threads"], r["repeats"],
                     f"{r['tokens_per_s']['hf']:.1f}", f"{r['tokens_per_s']['ours']:.1f}", f"{r['mfu_ours']:.2f}",
                     f"{r['mfu_hf']:.2f}", f"{median_high(r['matmul_fp32_flops_per_s']) / 1e9:.0f}",
                     f"{r['max_abs_logit_diff']:.1e}"] for r in _runs(bench, "world1_prefill")])
    return speed + _table("model | tokens | chunk | peak measured by | transformers MiB | lctk MiB | "
                          "KV cache MiB (both) | weights MiB (not counted)",
                          [[r["model"], r["tokens"], r["chunk_size"], r["ours"]["method"],
                            f"{r['hf']['delta_mib']:.0f}", f"{r['ours']['delta_mib']:.0f}",
                            f"{r['hf']['kv_cache_mib']:.0f}", f"{r['hf']['weights_mib']:.0f}"]
                           for r in _runs(bench, "world1_peak_memory")])


def _sp(bench: dict) -> list[str]:
    return _table("layout | tokens | world 1 (2 threads) s | world 2 (1 thread/rank) s | efficiency | "
                  "bytes measured / closed form | every layer, every rank equal",
                  [[r["layout"], r["tokens"], f"{r['median_s']['world1']:.2f}", f"{r['median_s']['world2']:.2f}",
                    f"{r['efficiency']:.3f}", f"{r['comm']['measured_bytes']} / {r['comm']['theory_bytes']}",
                    r["comm"]["every_layer_every_rank_equal"]] for r in _runs(bench, "sp2_")])


def _balance(bench: dict) -> list[str]:
    return _table("ring | tokens | zigzag max/mean | contiguous max/mean",
                  [[r["ring"], f"{r['tokens']:,}", f"{r['zigzag']['imbalance']:.4f}",
                    f"{r['contiguous']['imbalance']:.4f}"] for r in _runs(bench, "causal_balance")])


def _chunked(bench: dict) -> list[str]:
    out = []
    for r in _runs(bench, "chunked_memory"):
        default = {x["tokens"]: f"{x['activation_mib']:.1f}" for x in r["rows_glibc_default"]}
        out += _table("model | chunk | allocator | growth | growth, glibc default",
                      [[r["model"], r["chunk_size"], r["allocator"], f"{r['growth']:.3f}",
                        f"{r['growth_glibc_default']:.3f}"]])
        out += _table("tokens | peak above start MiB | KV cache MiB | activations MiB | activations MiB, glibc default",
                      [[x["tokens"], f"{x['delta_mib']:.1f}", f"{x['kv_cache_mib']:.1f}",
                        f"{x['activation_mib']:.1f}", default.get(x["tokens"], "-")] for x in r["rows"]])
    return out


def _needle(bench: dict) -> list[str]:
    out = []
    for r in _runs(bench, "needle"):
        out += _table("model | single | parallel | new tokens (greedy) | identical token sequences",
                      [[r["model"], r["single"], f"{r['parallel_layout']} on 2 ranks", r["new_tokens"],
                        f"{r['same_tokens']:.0%}"]])
        out += _table("prompt tokens | depth | passkey | single | parallel | same tokens",
                      [[x["prompt_tokens"], x["depth"], x["passkey"], YES[x["correct_single"]],
                        YES[x["correct_parallel"]], x["same_tokens"]] for x in r["rows"]])
    return out


def _deepspeed(bench: dict) -> list[str]:
    return _table("tokens | heads | KV heads | head dim | world | threads/rank | lctk ms | DeepSpeed ms | "
                  "largest output difference | peer",
                  [[r["tokens"], r["heads"], r["kv_heads"], r["head_dim"], r["world"], r["threads_per_rank"],
                    f"{r['median_s']['ours'] * 1e3:.0f}", f"{r['median_s']['deepspeed'] * 1e3:.0f}",
                    f"{r['max_abs_diff']:.1e}", f"`{r['peer']}`"] for r in _runs(bench, "ulysses_vs_deepspeed")])


def _decode(bench: dict) -> list[str]:
    out = []
    for r in _runs(bench, "decode_world1"):
        out += _table("cached tokens | transformers tokens/s | lctk tokens/s | lctk / transformers | ms/token | "
                      "planner ms/token | bytes/step MB | achieved / copy bandwidth",
                      [[x["tokens"], f"{x['tokens_per_s']['hf']:.1f}", f"{x['tokens_per_s']['ours']:.1f}",
                        f"{x['speed_vs_hf']:.2f}", f"{x['ms_per_token']:.1f}", f"{x['planner_ms_per_token']:.1f}",
                        f"{x['bytes_per_step'] / 1e6:.0f}", f"{x['bytes_vs_bound']:.2f}"] for x in r["rows"]])
        out += [f"{r['model']}, {r['threads']} threads, copy bandwidth {r['copy_bandwidth_gbps']:.1f} GB/s; "
                f"baseline: {r['baseline']}.", ""]
    out += _table("cached tokens | world 1 (2 threads) s | tp=2 s | ring=2 s | collectives per token | model",
                  [[r["tokens"], f"{median_high(r['world1_s']):.2f}", f"{median_high(r['tp2_s']):.2f}",
                    f"{median_high(r['ring2_s']):.2f}",
                    "; ".join(f"{k}: {v}" for k, v in r["calls"]["ring2"].items()) + f" over {r['steps']} steps x "
                    f"{len(r['world1_s'])} repeats", r["model"]] for r in _runs(bench, "decode_layouts")])
    out += _table("questions | new tokens each | document tokens | one by one s | one batch s | ratio",
                  [[r["questions"], r["new_tokens"], r["document_tokens"], f"{median_high(r['seconds']['sequential']):.1f}",
                    f"{median_high(r['seconds']['batch']):.1f}", f"{r['batch_vs_sequential']:.3f}"]
                   for r in _runs(bench, "decode_batch")])
    return out


def _million(million: dict) -> list[str]:
    rows = million["calibration"] + ([million["million"]] if million.get("million") else [])
    last, plan, predicted = rows[-1], rows[-1]["planner"], million.get("predicted_prefill_s")
    return _table("tokens | ring | prefill s | decode s (steps) | run memory MiB/rank (max) | planner MiB | "
                  "planner/measured | peak RSS MiB/rank (max)",
                  [[f"{r['tokens']:,}", r["world"], f"{r['prefill_s']:.1f}",
                    f"{r['decode_s']:.2f} ({r['decode_steps']})", f"{max(r['run_memory_mib_per_rank']):.0f}",
                    f"{r['planner']['memory_mib']:.0f}", f"{r['planner_vs_measured']:.2f}",
                    f"{max(r['peak_rss_mib_per_rank']):.0f}"] for r in rows]) + \
        _table("tokens | status | planner KV cache MiB | planner activations MiB (incl. pass-KV) | "
               "planner weights MiB | measured KV shard MiB (max) | runtime RSS before run MiB (max) | "
               "1M prefill predicted (a N^2 + b N) min",
               [[f"{last['tokens']:,}", million["status"], f"{plan['kv_cache_mib']:.0f}",
                 f"{plan['activations_mib']:.0f}", f"{plan['weights_mib']:.2f}",
                 f"{max(last['kv_cache_mib_per_rank']):.0f}", f"{max(last['rss_before_run_mib_per_rank']):.0f}",
                 f"{predicted / 60:.1f}" if predicted else "-"]])


def _pipeline(b: dict) -> list[str]:
    m, busy = b["model"], b["busy_by_stage"]
    return _table("stages P | chunks M | (P-1)/M | measured | measured / formula | "
                  "schedule from the measured chunk times | engine overhead",
                  [[b["stages"], b["chunks"], f"{b['formula_bubble']:.3f}", f"{b['measured_bubble']:.3f}",
                    f"{1 + b['relative_error']:.3f}", f"{b['schedule_bubble']:.3f}",
                    f"{b['engine_overhead']:+.3f}"]]) + \
        _table("layers | hidden | intermediate | chunk tokens | repeats | compute per stage s | stage spread | "
               "fill chunk / mean | drain chunk / mean | repeats range",
               [[m["layers"], m["hidden_size"], m["intermediate_size"], b["chunk_size"], len(b["per_repeat"]),
                 ", ".join(f"{s:.3f}" for s in busy), f"{max(busy) / min(busy) - 1:.0%}",
                 f"{b['first_chunk_stage0_over_mean']:.2f}", f"{b['last_chunk_last_stage_over_mean']:.2f}",
                 f"{min(b['per_repeat']):.3f} - {max(b['per_repeat']):.3f}"]])


def block(bench: dict, million: dict | None = None, gpu: dict | None = None, bubble: dict | None = None,
          command: str = COMMAND) -> str:
    """The measured block, markers included. A GPU dry run never stands in for a GPU's figures."""
    gpu_table = [] if not gpu or gpu.get("dry_run") else ["```", gpu.get("table", json.dumps(gpu)), "```", ""]
    lines = [START, ""] + _provenance(bench, command) + ["### Headline", "", report.markdown_table(bench["metrics"])]
    errors = [[name, error.splitlines()[0]] for name, error in bench.get("errors", {}).items()]
    lines += [""] + _table("benchmark that failed | error", errors)
    for title, body in (("World-1 prefill against transformers", _prefill(bench)),
                        ("Sequence parallelism at world 2, communication against the closed form", _sp(bench)),
                        ("Causal work per ring rank", _balance(bench)), ("Chunked-prefill memory", _chunked(bench)),
                        ("Needle in a haystack", _needle(bench)), ("Ulysses against DeepSpeed's", _deepspeed(bench)),
                        ("Decode", _decode(bench)),
                        ("One million tokens", _million(million) if million else []),
                        ("Pipeline bubble", _pipeline(bubble) if bubble else []),
                        ("GPU check", gpu_table)):
        lines += [f"### {title}", ""] + (body or ["Not run.", ""])
    return "\n".join(lines).rstrip() + "\n" + END


def splice(text: str, new_block: str) -> str:
    """text with its measured block replaced, everything outside the markers kept byte for
    byte; a text without markers gets the block appended."""
    start, end = text.find(START_TAG), text.find(END)
    if start < 0 or end < start:
        return text + ("\n" if text and not text.endswith("\n") else "") + new_block + "\n"
    return text[:start] + new_block + text[end + len(END):]


def write(out_dir, target, command: str = COMMAND) -> str:
    """Rewrite the measured block of `target` from out_dir/*.json."""
    out, path = Path(out_dir), Path(target)
    bench = _load(out / "bench.json") or _load(out / "bench-quick.json")
    if bench is None:
        raise FileNotFoundError(f"no bench.json or bench-quick.json in {out}: run `{command}` first")
    new = block(bench, _load(out / "million_tokens.json"), _load(out / "gpu_check.json"),
                _load(out / "pipeline_bubble.json"), command)
    text = path.read_bytes().decode("utf-8") if path.is_file() else ""  # bytes: line ends kept as they are
    path.write_bytes(splice(text, new).encode("utf-8"))
    return str(path)
