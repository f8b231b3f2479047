"""benchmarks/RESULTS.md from the JSON files a run leaves in benchmarks/out/."""
from __future__ import annotations

import json
from pathlib import Path

from . import report

COMMAND = "python benchmarks/run_all.py"

# What limits a metric when it misses its target (measured causes; see the detail sections).
LIMITS = {
    "world1_prefill_speed_vs_hf": "World 1 runs the same HF modules and the same CPU attention kernel as transformers; "
        "chunking adds a cache copy and a merge per chunk, so parity (within noise) is the ceiling on CPU.",
    "world1_peak_mem_vs_hf": "Both hold the full KV cache at the end; the saving is only in activations "
        "(one chunk instead of the whole prompt), so a deep model with a large cache bounds the ratio from below.",
    "prefill_mfu": "Profiled (torch.profiler, 8,192 tokens, SmolLM2-135M, one thread): 60% of the time in torch's CPU "
        "flash-attention kernel, 33% in the GEMMs of the linear layers (hidden 576: narrow, below the square-matmul "
        "rate), 7% in the element-wise ops of the HF modules (RMSNorm, RoPE, SiLU). Both kernels are torch's; "
        "transformers itself reaches a lower MFU on the same run (`mfu_hf` in the detail section).",
    "sp2_efficiency_ulysses": "One thread per rank against two threads in one process: the all-to-alls' copies and "
        "gloo's loopback transfer are not hidden under compute on CPU.",
    "sp2_efficiency_ring": "One thread per rank against two threads in one process; the K/V hops over gloo "
        "loopback and the fp32 merges are the overhead.",
    "chunked_mem_growth": "The figure is a difference of peak RSS readings; see the glibc note in the chunked-"
        "prefill section.",
    "ulysses_vs_deepspeed": "Ours also writes the rank's K and V into the KV cache (DeepSpeed's layer keeps none): a "
        "copy per layer that theirs does not make. Ours sends q, k and v in one all-to-all (theirs: three) and lays "
        "the received heads out as the CPU flash kernel reads fastest; the two are within noise of each other.",
    "zigzag_imbalance": "",
}


PLANNER_GAP = ("The planner counts every activation of a layer as alive at once (q, k, v, the attention output, "
    "gate, up and their product, residual and normed input): an upper bound, while the K/V terms (the cache shard "
    "and the two pass-KV buffers) are exact. At small prompts the activation bound dominates and the planner reads "
    "high; as the prompt grows the K/V terms take over and the ratio approaches 1.")


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _runs(result: dict, bench: str) -> list:
    return [r for r in result.get("runs", []) if r.get("bench", "").startswith(bench)]


def _f(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _prefill_section(result: dict) -> list[str]:
    out = []
    for r in _runs(result, "world1_prefill"):
        tps = r["tokens_per_s"]
        out += [f"**Speed** ({r['model']}, {r['tokens']} tokens, chunk {r['chunk_size']}, {r['threads']} threads, "
                f"{r['repeats']} interleaved repeats): transformers {tps['hf']:.1f} tokens/s, lctk {tps['ours']:.1f} "
                f"tokens/s; MFU lctk {r['mfu_ours']:.2f}, transformers {r['mfu_hf']:.2f} (fp32 matmul rate measured "
                f"before each run: median {sorted(r['matmul_fp32_flops_per_s'])[len(r['matmul_fp32_flops_per_s'])//2]/1e9:.0f} "
                f"GFLOP/s); largest logit difference {r['max_abs_logit_diff']:.1e}.", ""]
    for r in _runs(result, "world1_peak_memory"):
        out += [f"**Memory** ({r['model']}, {r['tokens']} tokens, chunk {r['chunk_size']}, fresh process each, "
                f"{r['ours']['method']}): above the RSS before the prefill, transformers {r['hf']['delta_mib']:.0f} "
                f"MiB, lctk {r['ours']['delta_mib']:.0f} MiB (KV cache {r['hf']['kv_cache_mib']:.0f} MiB in both; "
                f"weights {r['hf']['weights_mib']:.0f} MiB, not counted).", ""]
    return out


def _sp_section(result: dict) -> list[str]:
    out = ["| layout | tokens | world 1 (2 threads) s | world 2 (1 thread/rank) s | efficiency | bytes measured / "
           "closed form | every layer, every rank equal |", "|---|---|---|---|---|---|---|"]
    for r in _runs(result, "sp2_"):
        c = r["comm"]
        out.append(f"| {r['layout']} | {r['tokens']} | {r['median_s']['world1']:.2f} | {r['median_s']['world2']:.2f} "
                   f"| {r['efficiency']:.3f} | {c['measured_bytes']} / {c['theory_bytes']} | "
                   f"{c['every_layer_every_rank_equal']} |")
    if any(r["efficiency"] > 1.05 for r in _runs(result, "sp2_")):
        out += ["", SP_ABOVE_ONE]
    return out + [""]


SP_ABOVE_ONE = ("An efficiency above 1 means world 1 ran slower than the two ranks on the same cores. On this shared "
    "machine that is what other load does: a 2-thread OpenMP region waits for its slower thread at every op, so a "
    "thread that loses its core stalls the whole step, while two 1-thread ranks wait for each other only at the "
    "collectives (a few per layer). On a quiet machine the two are within a few percent of each other.")


def _balance_section(result: dict) -> list[str]:
    out = ["| ring | zigzag max/mean | contiguous max/mean |", "|---|---|---|"]
    for r in _runs(result, "causal_balance"):
        out.append(f"| {r['ring']} | {r['zigzag']['imbalance']:.4f} | {r['contiguous']['imbalance']:.4f} |")
    return out + [""]


def _chunk_section(result: dict) -> list[str]:
    out = []
    for r in _runs(result, "chunked_memory"):
        out += [f"{r['model']}, chunk {r['chunk_size']}, fresh process per length, glibc mmap threshold fixed "
                f"({r['allocator']}) so that freed buffers leave RSS:", "",
                "| tokens | peak above start MiB | KV cache MiB | activations MiB |", "|---|---|---|---|"]
        out += [f"| {x['tokens']} | {x['delta_mib']:.1f} | {x['kv_cache_mib']:.1f} | {x['activation_mib']:.1f} |"
                for x in r["rows"]]
        d = r["rows_glibc_default"]
        out += ["", f"Under glibc's default (dynamic) mmap threshold the same runs show {d[0]['activation_mib']:.1f} "
                f"MiB at {d[0]['tokens']} tokens and {d[-1]['activation_mib']:.1f} MiB at {d[-1]['tokens']} "
                f"(growth {r['growth_glibc_default']:.3f}): freed blocks kept by the allocator, more of them the more "
                "chunks run, not a buffer that grows with the prompt."]
    return out + [""]


def _needle_section(result: dict) -> list[str]:
    out = []
    for r in _runs(result, "needle"):
        out += [f"Single: {r['single']}. Parallel: {r['parallel_layout']} on 2 ranks. Greedy, {r['new_tokens']} new "
                f"tokens; identical token sequences in {r['same_tokens']:.0%} of cases.", "",
                "| prompt tokens | depth | passkey | single | parallel | same tokens |", "|---|---|---|---|---|---|"]
        out += [f"| {x['prompt_tokens']} | {x['depth']} | {x['passkey']} | {'yes' if x['correct_single'] else 'no'} | "
                f"{'yes' if x['correct_parallel'] else 'no'} | {x['same_tokens']} |" for x in r["rows"]]
    return out + [""]


def _deepspeed_section(result: dict) -> list[str]:
    out = []
    for r in _runs(result, "ulysses_vs_deepspeed"):
        out += [f"{r['tokens']} tokens, {r['heads']} heads, {r['kv_heads']} KV heads, head dim {r['head_dim']}, world "
                f"{r['world']}, {r['threads_per_rank']} thread per rank: lctk {r['median_s']['ours']*1e3:.0f} ms, "
                f"DeepSpeed {r['median_s']['deepspeed']*1e3:.0f} ms (median per call, slower rank); outputs differ "
                f"by at most {r['max_abs_diff']:.1e}. Peer: `{r['peer']}` with the same local kernel.", ""]
    return out


def _million_section(million: dict | None) -> list[str]:
    if not million:
        return ["Not run yet: `python benchmarks/million_tokens.py`.", ""]
    out = ["| tokens | prefill s | decode s (steps) | run memory MiB/rank (max) | planner MiB | planner/measured |"
           " peak RSS MiB/rank (max) |", "|---|---|---|---|---|---|---|"]
    rows = million["calibration"] + ([million["million"]] if million.get("million") else [])
    for r in rows:
        out.append(f"| {r['tokens']:,} | {r['prefill_s']:.1f} | {r['decode_s']:.2f} ({r['decode_steps']}) | "
                   f"{max(r['run_memory_mib_per_rank']):.0f} | {r['planner']['memory_mib']:.0f} | "
                   f"{r['planner_vs_measured']:.2f} | {max(r['peak_rss_mib_per_rank']):.0f} |")
    plan = rows[-1]["planner"]
    out += ["", f"Planner terms at {rows[-1]['tokens']:,} tokens, per rank: KV cache {plan['kv_cache_mib']:.0f} MiB, "
            f"activations incl. the two pass-KV buffers {plan['activations_mib']:.0f} MiB, weights "
            f"{plan['weights_mib']:.2f} MiB; measured KV cache shard {max(rows[-1]['kv_cache_mib_per_rank']):.0f} MiB."]
    out += ["", f"Status: {million['status']}. Memory per rank: peak RSS during prefill and decode above the RSS "
            "before them (model built, short warm-up done), plus the weights; the Python/torch/gloo runtime under "
            f"it was {max(rows[-1]['rss_before_run_mib_per_rank']):.0f} MiB per rank. The planner's prediction is "
            "`toolkit.planner.cost.estimate` for the same model, ring=4, chunk, dtype and new tokens."]
    last = rows[-1]
    if any(abs(r["planner_vs_measured"] - 1) > 0.2 for r in rows):
        off = ", ".join(f"{r['tokens']:,}" for r in rows if abs(r["planner_vs_measured"] - 1) > 0.2)
        out += ["", f"The planner is off by more than 20% at {off} tokens "
                f"({'not' if abs(last['planner_vs_measured'] - 1) > 0.2 else 'but not'} at {last['tokens']:,}). "
                + PLANNER_GAP]
    if million.get("predicted_prefill_s"):
        out += ["", f"Prediction of the 1M prefill from the smaller runs (a N^2 + b N): "
                f"{million['predicted_prefill_s'] / 60:.1f} min."]
    return out + [""]


def _pipeline_section(bubble: dict | None) -> list[str]:
    if not bubble:
        return ["Not run yet: `python benchmarks/pipeline_bubble.py`.", ""]
    m = bubble["model"]
    rows = ["| stages P | chunks M | (P-1)/M | measured | measured / formula | schedule from the measured chunk "
            "times | engine overhead |", "|---|---|---|---|---|---|---|",
            f"| {bubble['stages']} | {bubble['chunks']} | {bubble['formula_bubble']:.3f} | "
            f"{bubble['measured_bubble']:.3f} | {1 + bubble['relative_error']:.3f} | {bubble['schedule_bubble']:.3f} | "
            f"{bubble['engine_overhead']:+.3f} |"]
    stage_s = ", ".join(f"{s:.3f}" for s in bubble["busy_by_stage"])
    spread = max(bubble["busy_by_stage"]) / min(bubble["busy_by_stage"]) - 1
    lo, hi = min(bubble["per_repeat"]), max(bubble["per_repeat"])
    return rows + ["", f"Random-weight Llama, {m['layers']} layers split {bubble['stages']} ways (hidden "
                   f"{m['hidden_size']}, intermediate {m['intermediate_size']}: MLP-dominated, so chunks of "
                   f"{bubble['chunk_size']} tokens cost nearly the same), one thread per stage, median of "
                   f"{len(bubble['per_repeat'])} repeats. Bubble = wall time over the busiest stage's compute, minus "
                   f"one. Compute per stage: {stage_s} s. The fill chunk (stage 0 alone) took "
                   f"{bubble['first_chunk_stage0_over_mean']:.2f}x its stage's mean chunk, the drain chunk (last "
                   f"stage alone) {bubble['last_chunk_last_stage_over_mean']:.2f}x. The schedule column replays "
                   "the flow-shop recurrence on the measured per-chunk times: the planner's bubble "
                   "(`toolkit.planner.cost.pipeline_bubble`) is that schedule, (P-1) max(t) / sum(t), which for "
                   "causal chunks of a long prompt (attention over everything before them) is up to twice (P-1)/M.",
                   "", f"How far to trust it: the stages have identical layers, yet their compute differed by "
                   f"{spread:.0%} in this run (which stage is slower changes from run to run on this shared 2-core "
                   f"machine), and the repeats ranged from {lo:.3f} to {hi:.3f}. The engine's own cost beyond the "
                   "schedule (the last stage's logits broadcast, the sends) is the overhead column.", ""]


def _gpu_section(gpu: dict | None) -> list[str]:
    if not gpu or gpu.get("dry_run"):
        return ["Not run: no GPU was available to the session that wrote this file. On a GPU machine run "
                "`bash benchmarks/gpu_check.sh` (writes benchmarks/out/gpu_check.json), then "
                f"`{COMMAND} --render` to put its table here.", ""]
    return ["```", gpu.get("table", json.dumps(gpu, indent=1)), "```", ""]


def render(bench: dict, million: dict | None, gpu: dict | None, command: str = COMMAND,
           bubble: dict | None = None) -> str:
    m = bench["metrics"]
    missed = [n for n in report.TARGETS if report.verdict(n, m) == "missed"]
    mc = bench.get("machine", {})
    lines = [
        "# Benchmark results", "",
        f"Generated by `{command}` ({bench['mode']} suite, {bench['seconds'] / 60:.0f} min, plus the pipeline "
        f"bubble and the million-token run) on {mc.get('date', '?')}: {mc.get('cpu_count', '?')} CPU cores, torch {mc.get('torch', '?')}, "
        "no GPU. Do not edit by hand; rerun the command.", "",
        "Every timed figure is a ratio against a baseline measured in the same run (alternating repeats, median "
        "of paired ratios) or a count against a closed form. The machine is a shared virtual one: absolute "
        "seconds are noisy; the ratios are what to read.", "",
    ]
    for rerun in bench.get("reruns", []):
        lines += [f"Rerun afterwards (`{command} --only {' --only '.join(rerun['benchmarks'])}`, "
                  f"{rerun['machine'].get('date', '?')}): {', '.join(rerun['benchmarks'])}.", ""]
    lines += [
        "## Headline", "", report.markdown_table(m), "",
        "![summary](figures/bench_summary.png)", "",
    ]
    if missed:
        lines += ["## Targets missed, and what limits them", ""]
        lines += [f"- `{n}` = {m[n]:.3f} (target {report.target_text(n)}): {LIMITS.get(n, '')}" for n in missed]
        lines.append("")
    if bench.get("errors"):
        lines += ["## Benchmarks that failed", ""] + [f"- {k}: {v}" for k, v in bench["errors"].items()] + [""]
    lines += ["## World-1 prefill against transformers", ""] + _prefill_section(bench)
    lines += ["## Sequence parallelism at world 2, and communication against the closed form", ""] + _sp_section(bench)
    lines += ["## Causal work per ring rank (toolkit.attention.ring.causal_work_per_rank, 131,072 tokens)", ""]
    lines += _balance_section(bench)
    lines += ["## Chunked-prefill memory", ""] + _chunk_section(bench)
    lines += ["## Needle in a haystack (SmolLM2-135M-Instruct)", ""] + _needle_section(bench)
    lines += ["## Our Ulysses layer against DeepSpeed's DistributedAttention", ""] + _deepspeed_section(bench)
    lines += ["## One million tokens: ring=4 on CPU, micro model", ""] + _million_section(million)
    lines += ["## Pipeline bubble against (P-1)/M", ""] + _pipeline_section(bubble)
    lines += ["## GPU check (one H200)", ""] + _gpu_section(gpu)
    return "\n".join(lines).rstrip() + "\n"


def write(out_dir, target, command: str = COMMAND) -> str:
    out = Path(out_dir)
    bench = _load(out / "bench.json") or _load(out / "bench-quick.json")
    if bench is None:
        raise FileNotFoundError(f"no bench.json in {out}: run `{command}` first")
    text = render(bench, _load(out / "million_tokens.json"), _load(out / "gpu_check.json"), command,
                  _load(out / "pipeline_bubble.json"))
    Path(target).write_text(text, encoding="utf-8")
    return str(target)


README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def readme_block(bench: dict, million: dict | None, bubble: dict | None, command: str = COMMAND) -> str:
    """The README's headline: the metric table, the million-token row, the bubble, the plot."""
    m, mc = bench["metrics"], bench.get("machine", {})
    lines = [README_START,
             f"Measured by `{command}` on {mc.get('date', '?')} ({mc.get('cpu_count', '?')} CPU cores, no GPU; "
             "every timed figure a ratio against a baseline run alongside it). Details, causes of the misses and "
             "the raw figures: [benchmarks/RESULTS.md](benchmarks/RESULTS.md).", "", report.markdown_table(m), ""]
    top = (million or {}).get("million")
    if top:
        lines.append(f"One million tokens ({top['tokens']:,}), ring={top['world']} on CPU, micro model: prefill "
                     f"{top['prefill_s'] / 60:.1f} min, {top['decode_steps']} decode steps {top['decode_s']:.1f} s, "
                     f"memory {max(top['run_memory_mib_per_rank']):.0f} MiB per rank against the planner's "
                     f"{top['planner']['memory_mib']:.0f} MiB (ratio {top['planner_vs_measured']:.2f}).")
    if bubble:
        spread = max(bubble["busy_by_stage"]) / min(bubble["busy_by_stage"]) - 1
        lines += ["", f"Pipeline bubble, P={bubble['stages']}, M={bubble['chunks']}: measured "
                  f"{bubble['measured_bubble']:.3f} against (P-1)/M = {bubble['formula_bubble']:.3f} "
                  f"({bubble['relative_error']:+.0%}; the two identical stages' compute differed by {spread:.0%} "
                  "on this shared machine, so read it with RESULTS.md's caveats)."]
    lines += ["", "![benchmark summary](benchmarks/figures/bench_summary.png)", README_END]
    return "\n".join(lines)


def update_readme(readme, out_dir, command: str = COMMAND) -> bool:
    """Replace the block between the results markers of the README; False if it has none."""
    out = Path(out_dir)
    bench = _load(out / "bench.json") or _load(out / "bench-quick.json")
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    if bench is None or README_START not in text or README_END not in text:
        return False
    block = readme_block(bench, _load(out / "million_tokens.json"), _load(out / "pipeline_bubble.json"), command)
    head, rest = text.split(README_START, 1)
    path.write_text(head + block + rest.split(README_END, 1)[1], encoding="utf-8")
    return True
