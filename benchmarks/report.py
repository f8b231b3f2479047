"""Targets, the metric table, and plots of a benchmark run."""
from __future__ import annotations

import sys
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

# metric -> (kind, bound, what the number is). kind: ">=", "<=", "~=" (within 0.01), "info"
TARGETS = {
    "world1_prefill_speed_vs_hf": (">=", 1.0, "our world-1 chunked prefill tokens/s over transformers (sdpa, logits_to_keep=1)"),
    "world1_peak_mem_vs_hf": ("<=", 0.8, "our peak memory above baseline over transformers', same prefill"),
    "prefill_mfu": (">=", 0.7, "our prefill FLOP/s over the fp32 matmul rate measured next to it"),
    "sp2_efficiency_ulysses": (">=", 0.9, "T(world 1, 2 threads) / T(ulysses=2, 1 thread per rank)"),
    "sp2_efficiency_ring": (">=", 0.9, "T(world 1, 2 threads) / T(ring=2 zigzag pass-KV, 1 thread per rank)"),
    "comm_bytes_vs_theory_ulysses": ("~=", 1.0, "measured all-to-all bytes per rank per layer over the closed form"),
    "comm_bytes_vs_theory_ring": ("~=", 1.0, "measured ring bytes per rank per layer over the closed form"),
    "zigzag_imbalance": ("<=", 1.05, "max/mean causal attention work per rank, ring=4, zigzag"),
    "contiguous_imbalance": ("info", None, "the same, contiguous layout ((2R-1)/R = 1.75 expected: the last rank's strip of the triangle)"),
    "chunked_mem_growth": ("<=", 1.1, "activation memory at 64K tokens over 8K (tiny model, chunk 4096)"),
    "needle_accuracy_single": ("info", None, "passkey found, transformers generate, one process"),
    "needle_accuracy_parallel": ("==single", None, "passkey found, ring=2 on 2 ranks (target: equal to single)"),
    "ulysses_vs_deepspeed": ("<=", 1.0, "our Ulysses layer's time over DeepSpeed DistributedAttention's, world 2"),
    "load_peak_rss_vs_checkpoint_tp4": ("<=", 0.4, "largest rank's load peak RSS (less a one-layer-per-stage run's) over the checkpoint, tp=4, fp32"),
    "load_peak_rss_vs_checkpoint_tp4_bf16": ("<=", 0.25, "the same, converted to bf16 while loading"),
    "load_peak_rss_vs_checkpoint_pp2": ("<=", 0.65, "the same, pp=2, fp32"),
    "load_peak_rss_vs_checkpoint_pp2_bf16": ("<=", 0.35, "the same, pp=2, converted to bf16"),
    "load_peak_rss_vs_checkpoint_tp2pp2": ("info", None, "the same, tp=2 x pp=2, fp32"),
    "load_peak_rss_vs_checkpoint_tp2pp2_bf16": ("info", None, "the same, tp=2 x pp=2, converted to bf16"),
    "load_peak_rss_vs_checkpoint_tp4_whole": ("info", None, "the whole-model path (HF from_pretrained, then AutoTP), tp=4, fp32"),
    "load_peak_rss_vs_checkpoint_tp4_bf16_whole": ("info", None, "the whole-model path, tp=4, converted to bf16"),
    "ask_ttft_vs_fresh": ("<=", 0.05, "time to first token of a question after a prefilled document over a fresh generate of document + question, demo model, ring=2, ~8K tokens"),
    "cache_load_vs_prefill": ("<=", 0.1, "loading the saved document cache over prefilling the document, same run"),
    "cache_load_checksum_vs_none": ("<=", 1.3, "loading the saved cache with every rank file's checksum (xxh3-128) checked over the same load without (interleaved, ring=2)"),
    "cache_disk_vs_kv_bytes": ("<=", 1.02, "the saved cache's size on disk over the closed-form K/V bytes (target 1.00 +- 0.02)"),
    "serve_overhead": ("<=", 1.1, "a completion through `lctk serve` (openai client, one rank) over the same generate in-process"),
    "serve_cached_ttft_vs_cold": ("<=", 0.1, "time to first token with a 4K-token document in the prefix cache over a cold request"),
    "doc8_kv_vs_one": ("<=", 1.25, "8 questions about one 4K-token document sent at once: the server's peak KV bytes over one question's alone"),
    "doc8_vs_sequential": ("<=", 0.35, "the same 8 at once over one after another (the first prefills the document, the rest read it cached)"),
    "world1_decode_speed_vs_hf_4k": (">=", 1.2, "our world-1 decode tokens/s over transformers' cached forward loop, demo model, 4K-token cache"),
    "world1_decode_speed_vs_hf_16k": (">=", 1.2, "the same at a 16K-token cache"),
    "decode_bytes_per_token_vs_bound": (">=", 0.7, "bytes a decode step reads (weights + cache) per second, over the copy bandwidth measured in the run, 4K"),
    "decode_outside_ops_share": ("<=", 0.2, "share of a 4K decode step's time outside the operators (torch.profiler)"),
    "planner_decode_vs_measured": ("within", 0.3, "measured ms/token over the planner's, fed this machine's measured bandwidth, 4K (target 1 +- 0.3)"),
    "tp2_decode_speedup": ("info", None, "world-1 (2 threads) decode step time over tp=2's (1 thread per rank), 4K"),
    "tp2_decode_speedup_planner": ("info", None, "the planner's figure for the same, from measured 2- and 1-thread bandwidths"),
    "ring2_decode_overhead": ("info", None, "ring=2 decode step time (1 thread per rank) over world 1's (2 threads), 4K"),
    "ring2_decode_overhead_planner": ("info", None, "the planner's figure for the same"),
    "ring2_decode_collectives_per_layer": ("~=", 1.0, "ring=2 decode collectives per token per layer over the closed form (one all-gather of out, lse)"),
    "chats16_vs_sequential": ("<=", 0.25, "16 short chats (~100 prompt, 64 new tokens) through one generate(list) over the same 16 one after another, world 1 (answers equal)"),
    "chats16_ring2_vs_sequential": ("<=", 0.35, "the same on 2 ranks at ring=2"),
    "short_ttft_vs_long_prefill": ("<=", 0.1, "a chat arriving while an ~8K-token prompt prefills: its time to first token over that prefill alone (server settings: 512-token steps)"),
    "itl_p99_during_prefill_vs_idle": ("<=", 4.0, "running chats' p99 time between tokens while the long prompt prefills (--max-itl-ms at 3x idle p50) over their idle p50"),
    "summarize_map_batched_vs_one": ("<=", 0.5, "the map step of a summary needing 8 sections, its sections as one batch, over the same sections one at a time (same engine), world 1"),
    "generate_decode_vs_hf": (">=", 1.2, "decode tokens/s of generate() (the user's call, --speculate off: one token a step) after a real 4K-token prefill, 40 new tokens, over transformers' cached forward loop after the same prefill, world 1"),
    "speculate_quote_auto_vs_off": (">=", 2.0, "decode tokens/s, --speculate auto over off: answers that quote a ~4K-token document and a summary of it, world 1 (answers equal)"),
    "speculate_quote_ring2_auto_vs_off": (">=", 1.6, "the same on 2 ranks at ring=2"),
    "speculate_vs_hf_prompt_lookup": (">=", 1.3, "ours (auto) over transformers' generate(prompt_lookup_num_tokens=K, its best K of 3 and 10) on the same prompts and token counts, decode tokens/s, world 1"),
    "speculate_story_auto_vs_off": (">=", 0.95, "free text that copies nothing (a story), auto over off, world 1"),
    "speculate_acceptance": ("info", None, "guessed tokens kept over guessed tokens checked, the quoting answers with auto"),
    "speculate_tokens_per_step": ("info", None, "tokens a decode step gave on average, the same answers"),
    "cpu_linear_decode_speedup": ("info", None, "decode tokens/s after a ~4K-token document, world 1, the linears as CpuLinear over nn.Linear, same answers"),
    "cpu_linear_time_m1": ("info", None, "the demo model's linears called with 1 row: CpuLinear's kernel (W @ x^T as 2 rows) over F.linear, time"),
    "cpu_linear_time_m2": ("info", None, "the same with 2 rows (W @ x^T)"),
    "cpu_linear_time_m5": ("info", None, "the same with 5 rows (W @ x^T: MAX_ROWS)"),
    "cpu_linear_time_m6": ("info", None, "the same with 6 rows (oneDNN's GEMM from here on)"),
    "cpu_linear_time_m9": ("info", None, "the same with 9 rows"),
    "cpu_linear_time_m16": ("info", None, "the same with 16 rows (a batch of 16 chats)"),
    "cpu_linear_time_m64": ("info", None, "the same with 64 rows"),
    "cpu_linear_time_m512": ("info", None, "the same with 512 rows (a prefill chunk)"),
    "cpu_linear_time_m1_1thread": ("info", None, "1 row on one thread (a ring rank's share of 2 cores)"),
    "cpu_linear_time_m2_1thread": ("info", None, "2 rows on one thread"),
    "cpu_linear_time_m5_1thread": ("info", None, "5 rows on one thread"),
    "cpu_linear_time_m6_1thread": ("info", None, "6 rows on one thread"),
    "cpu_linear_time_m9_1thread": ("info", None, "9 rows on one thread"),
    "cpu_linear_few_rows_vs_onednn_m5": ("info", None, "W @ x^T over oneDNN's GEMM at 5 rows (below 1: why W @ x^T up to MAX_ROWS)"),
    "cpu_linear_few_rows_vs_onednn_m6": ("info", None, "the same at 6 rows (past MAX_ROWS)"),
    "cpu_linear_few_rows_vs_onednn_m9": ("info", None, "the same at 9 rows"),
    "cpu_linear_few_rows_vs_onednn_m5_1thread": ("info", None, "the same at 5 rows on one thread"),
    "cpu_linear_few_rows_vs_onednn_m6_1thread": ("info", None, "the same at 6 rows on one thread"),
    "cpu_linear_few_rows_vs_onednn_m9_1thread": ("info", None, "the same at 9 rows on one thread"),
    "speculate_quote_answer_auto_vs_off": ("info", None, "the first figure's quoting answer alone (what guessing wins where the model copies)"),
    "speculate_summary_answer_auto_vs_off": ("info", None, "the first figure's summary alone (the demo model's summary copies little of the document: what bounds the first figure)"),
    "speculate_summary_tokens_per_step": ("info", None, "tokens a decode step gave on average in that summary"),
    "elastic_chats16_ring2_vs_ideal": ("<=", 1.15, "16 short chats (~100 prompt, 64 new tokens) on 2 ranks at ring=2 with elastic placement over two independent one-rank processes taking 8 each (answers equal)"),
    "elastic_off_chats16_ring2_vs_ideal": ("info", None, "the same without elastic placement (every chat on both ranks) over the ideal"),
    "elastic_chats32_4ranks_vs_ideal": ("<=", 1.25, "32 short chats on 4 ranks (ring=4: the demo model's 9 heads admit no ulysses=2), elastic, over four independent one-rank processes taking 8 each"),
    "elastic_long_alone_vs_off": ("<=", 1.05, "one long prompt (8K tokens; quick: 4K) alone on the ring=2 ranks, elastic over off"),
    "elastic_plan_trace_vs_fixed": ("info", None, "on paper: 200 prompts, median 64K tokens, tail to 1M, Llama-3.1-8B on 8 H100s (ulysses=8), predicted requests/s elastic over every request on all 8, each arriving to an idle server (fewest ranks within 5% of the fastest); each request alone on its block, blocks packed perfectly"),
    "elastic_plan_trace_loaded": ("info", None, "the same while requests wait (each on the degree cheapest in rank-seconds within 2x of its fastest)"),
    "elastic_degree_vs_fastest": ("<=", 1.10, "at 512, 2K and 8K-token prompts (quick: 512, 2K), the time at the degree elastic placement chose over the fastest of 1 and 2 ranks measured, the worst length"),
    "long_in_mix_vs_alone": ("<=", 1.5, "the long request's own time beside the chats over its time alone"),
    "batch8_vs_sequential": ("<=", 0.35, "8 questions after one document decoded as one batch over 8 asks in turn (answers equal)"),
    "swa_ring_work_ratio": ("<=closed", 1.05, "attention FLOPs a sliding-window layer (W=1024) computes in a 32K ring=2 prefill over a global layer's (target: the closed form + 5%)"),
    "swa_ring_work_ratio_closed_form": ("info", None, "sum_p min(p+1, W) / sum_p (p+1) at 32K, W=1024"),
    "kv_needle_accuracy_auto": ("info", None, "passkey found with the cache in the model's dtype (fp32), the needle prompts"),
    "kv_needle_accuracy_int8": ("==full", None, "the same with an int8 cache (target: equal to full precision)"),
    "kv_needle_accuracy_fp8": ("==full", None, "the same with an fp8 e4m3 cache (target: equal to full precision)"),
    "kv_needle_accuracy_int4": ("info", None, "the same with an int4 cache (reported as it is)"),
    "kv_kl_int8": ("<=", 0.01, "mean KL(full || int8) of the next-token distribution over positions of a real text"),
    "kv_kl_fp8": ("<=", 0.01, "the same, fp8"),
    "kv_kl_int4": ("info", None, "the same, int4"),
    "kv_bytes_ratio_int8": ("==closed", None, "cache bytes over a bf16 cache's, int8 (target: the closed form (d+4)/2d)"),
    "kv_bytes_ratio_fp8": ("==closed", None, "the same, fp8 ((d+4)/2d)"),
    "kv_bytes_ratio_int4": ("==closed", None, "the same, int4 ((d/2+4)/2d)"),
    "ring_kv_bytes_ratio_int8": ("info", None, "bytes ring=2 pass-KV hops carry over a bf16 cache's, int8"),
    "ring_kv_bytes_ratio_fp8": ("info", None, "the same, fp8"),
    "ring_kv_bytes_ratio_int4": ("info", None, "the same, int4"),
    "load_s_vs_whole": ("<=", 1.0, "our load time over the whole-model path's, tp=4, fp32 (median of interleaved fresh runs)"),
}


def verdict(name: str, metrics: dict) -> str:
    """'met', 'missed', 'n/a' (no target) or 'not run'."""
    if name not in metrics or metrics[name] is None:
        return "not run"
    kind, bound, _ = TARGETS[name]
    value = metrics[name]
    if kind == "info":
        return "n/a"
    if kind == "==single":
        other = metrics.get("needle_accuracy_single")
        return "not run" if other is None else ("met" if value == other else "missed")
    if kind in ("<=closed", "==closed"):
        closed = metrics.get(f"{name}_closed_form")
        if closed is None:
            return "not run"
        return "met" if (value <= bound * closed if kind == "<=closed" else abs(value - closed) <= 1e-9) else "missed"
    if kind == "==full":
        full = metrics.get("kv_needle_accuracy_auto")
        return "not run" if full is None else ("met" if value == full else "missed")
    ok = {">=": value >= bound, "<=": value <= bound, "~=": abs(value - bound) <= 0.01,
          "within": abs(value - 1) <= bound}[kind]
    return "met" if ok else "missed"


def target_text(name: str) -> str:
    kind, bound, _ = TARGETS[name]
    if kind == "within":
        return f"1 +- {bound:g}"
    if kind == "<=closed":
        return f"<= closed form x {bound:g}"
    if kind == "==closed":
        return "= closed form"
    if kind == "==full":
        return "= full precision"
    return {"info": "-", "==single": "= single", "~=": "1.00 +- 0.01"}.get(kind, f"{kind} {bound:g}" if bound else "-")


def table_rows(metrics: dict) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for name, (_kind, _bound, what) in TARGETS.items():
        value = metrics.get(name)
        shown = "-" if value is None else f"{value:.3f}"
        rows.append((name, shown, target_text(name), verdict(name, metrics), what))
    return rows


def metric_table(metrics: dict) -> Table:
    """metric, value, target, verdict: one row a metric, a rule under the header."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column, justify in (("metric", "left"), ("value", "right"), ("target", "left"), ("verdict", "left")):
        table.add_column(column, justify=justify, no_wrap=True)
    for row in table_rows(metrics):
        table.add_row(*row[:4])
    return table


def print_table(metrics: dict, out=None) -> None:
    """The metric table on `out` (default stdout): colour only on a terminal, 120 columns
    in a pipe so that no row wraps."""
    out = out or sys.stdout
    try:
        terminal = out.isatty()
    except (AttributeError, ValueError):
        terminal = False
    Console(file=out, width=120, force_terminal=None if terminal else False, no_color=not terminal,
            highlight=False, soft_wrap=False).print(metric_table(metrics))


def markdown_table(metrics: dict) -> str:
    lines = ["| metric | value | target | verdict | what it compares |", "|---|---|---|---|---|"]
    lines += [f"| `{n}` | {v} | {t} | {s} | {w} |" for n, v, t, s, w in table_rows(metrics)]
    return "\n".join(lines)


# ---- plots ----------------------------------------------------------------------------------
def _runs(result: dict, bench: str) -> list[dict]:
    return [r for r in result.get("runs", []) if r.get("bench", "").startswith(bench)]


def plot_summary(result: dict, path) -> str | None:
    """One figure (the README's): prefill vs HF, SP efficiency, chunked memory, needle
    accuracy, decode tokens/s against context. Panels without data are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    speed, mem = _runs(result, "world1_prefill"), _runs(result, "world1_peak_memory")
    if speed or mem:
        panels.append(("prefill", speed, mem))
    if _runs(result, "sp2_"):
        panels.append(("sp", _runs(result, "sp2_")))
    if _runs(result, "chunked_memory"):
        panels.append(("chunk", _runs(result, "chunked_memory")[0]))
    if _runs(result, "needle"):
        panels.append(("needle", _runs(result, "needle")[0]))
    if _runs(result, "decode_world1"):
        panels.append(("decode", _runs(result, "decode_world1")[0]))
    if _runs(result, "kv_dtypes"):
        panels.append(("kv", _runs(result, "kv_dtypes")[0]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        kind = panel[0]
        if kind == "prefill":
            labels, ours, hf = [], [], []
            if panel[1]:
                labels.append(f"tokens/s\n({panel[1][0]['tokens']} tok)")
                ours.append(result["metrics"]["world1_prefill_speed_vs_hf"]), hf.append(1.0)
            if panel[2]:
                m = panel[2][0]
                labels.append(f"peak memory\n({m['tokens']} tok)")
                ours.append(m["ratio"]), hf.append(1.0)
            x = range(len(labels))
            ax.bar([i - 0.2 for i in x], hf, 0.4, label="transformers", color="#999999")
            bars = ax.bar([i + 0.2 for i in x], ours, 0.4, label="lctk", color="#1f77b4")
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
            ax.set_xticks(list(x), labels)
            ax.set_ylim(0, max(1.3, 1.15 * max(ours)))
            ax.set_ylabel("relative to transformers")
            ax.set_title("world-1 prefill")
            ax.legend(fontsize=8, loc="upper right")
        elif kind == "sp":
            names = [r["bench"].replace("sp2_", "") for r in panel[1]]
            effs = [r["efficiency"] for r in panel[1]]
            ax.bar_label(ax.bar(names, effs, 0.5, color="#2ca02c"), fmt="%.2f", fontsize=8)
            ax.axhline(0.9, ls="--", c="k", lw=1, label="target 0.9")
            ax.set_ylim(0, max(1.3, 1.15 * max(effs)))
            ax.set_ylabel("T(world 1) / T(world 2)")
            ax.set_title(f"SP efficiency, world 2 ({panel[1][0]['tokens']} tok)")
            ax.legend(fontsize=8, loc="upper right")
        elif kind == "chunk":
            rows = panel[1]["rows"]
            xs = [r["tokens"] / 1024 for r in rows]
            ax.plot(xs, [r["activation_mib"] for r in rows], "o-", label="activations")
            ax.plot(xs, [r["kv_cache_mib"] for r in rows], "s--", label="KV cache")
            ax.set_xlabel("prompt tokens (K)")
            ax.set_ylabel("MiB")
            ax.set_title(f"chunked prefill memory (chunk {panel[1]['chunk_size']})")
            ax.legend(fontsize=8)
        elif kind == "kv":
            rows = [r for r in panel[1]["rows"] if "kl_mean" in r]
            names = [r["kv_dtype"] for r in rows]
            metrics = result["metrics"]
            x = range(len(names))
            ax.bar([i - 0.2 for i in x], [metrics[f"kv_bytes_ratio_{n}"] for n in names], 0.4,
                   label="cache bytes / bf16's", color="#1f77b4")
            ax.bar([i + 0.2 for i in x], [r["kl_mean"] for r in rows], 0.4, label="mean KL vs full", color="#d62728")
            ax.set_xticks(list(x), names)
            ax.set_yscale("log")
            ax.axhline(0.01, ls="--", c="k", lw=1, label="KL target 0.01")
            ax.set_title("quantised KV cache")
            ax.legend(fontsize=7, loc="lower left")
        elif kind == "decode":
            rows = panel[1]["rows"]
            xs = [r["tokens"] / 1024 for r in rows]
            ax.plot(xs, [r["tokens_per_s"]["hf"] for r in rows], "s--", color="#999999", label="transformers")
            ax.plot(xs, [r["tokens_per_s"]["ours"] for r in rows], "o-", color="#1f77b4", label="lctk")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("cached tokens (K)")
            ax.set_ylabel("decode tokens/s")
            ax.set_ylim(0, None)
            ax.set_title(f"world-1 decode, {panel[1]['threads']} threads")
            ax.legend(fontsize=8)
        else:
            rows = panel[1]["rows"]
            lengths = sorted({r["length"] for r in rows})
            for name, off, color in (("single", -0.2, "#999999"), ("parallel", 0.2, "#1f77b4")):
                acc = [sum(r[f"correct_{name}"] for r in rows if r["length"] == n) /
                       sum(1 for r in rows if r["length"] == n) for n in lengths]
                ax.bar([i + off for i in range(len(lengths))], acc, 0.4, label=name, color=color)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_xlabel("prompt tokens")
            ax.set_ylim(0, 1.35)
            ax.set_title("needle accuracy, SmolLM2-135M")
            ax.legend(fontsize=8, loc="upper right", ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)
