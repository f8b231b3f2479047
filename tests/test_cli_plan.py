"""`lctk plan` and `lctk presets`, invoked as standalone click commands."""
import json

import pytest
from pathlib import Path

from click.testing import CliRunner

from toolkit.cli.plan import plan_command
from toolkit.cli.presets import presets_command
from toolkit.planner.presets import list_presets

LAYOUT_KEYS = {"tp", "ulysses", "ring", "pp", "valid", "reasons", "memory_gib_per_device",
               "prefill_seconds", "decode_ms_per_token"}


def run(*args: str):
    return CliRunner().invoke(plan_command, list(args))


def plan_rows(lines: list[str]) -> list[tuple[list[str], str]]:
    """The candidates table's rows as (leading cells, verdict), a verdict's wrapped lines joined.

    The table sits between its header (`tp ... verdict`, then a rule) and the `chosen:` line;
    a line with nothing left of the verdict column continues the row above."""
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["tp"])
    offset = lines[start].index("verdict")
    assert set(lines[start + 1].strip()) == {"─"}
    rows: list[tuple[list[str], str]] = []
    for line in lines[start + 2:]:
        if line.startswith(("chosen: ", "warning: ")):
            break
        assert len(line) <= 120, line  # drawn for CliRunner's 120 columns; verdicts wrap
        cells, verdict = line[:offset].split(), line[offset:].strip()
        if cells:
            rows.append((cells, verdict))
        elif verdict:
            rows[-1] = (rows[-1][0], f"{rows[-1][1]} {verdict}")
    return rows


def test_table_marks_the_chosen_layout_and_rejected_reasons():
    args = ("--model", "llama-3.1-70b", "--gpus", "16", "--context", "128K")
    result = run(*args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "131,072 prompt tokens" in lines[0]
    assert "\x1b" not in result.stdout  # no colour or style codes off a terminal
    assert sum(line.startswith("*") for line in lines) == 1
    assert any(line.startswith("chosen: ") for line in lines)
    payload = json.loads(run(*args, "--json").stdout)
    rows = plan_rows(lines)
    assert len(rows) == len(payload["candidates"])
    verdicts = [verdict.split()[0].rstrip(";:") for _, verdict in rows]
    n_valid = sum(c["valid"] for c in payload["candidates"])
    assert verdicts == ["ok"] * n_valid + ["rejected"] * (len(rows) - n_valid)
    marked = [cells for cells, _ in rows if cells[0] == "*"]
    assert marked == [rows[0][0]]  # the chosen layout is marked, and it is the best one
    chosen = payload["chosen"]
    assert marked[0][1:5] == [str(chosen[key]) for key in ("tp", "ulysses", "ring", "pp")]
    assert f"{chosen['memory_gib_per_device']:.1f}" == marked[0][5]
    tp16 = [verdict for cells, verdict in rows if cells[:4] == ["16", "1", "1", "1"]]
    assert len(tp16) == 1 and tp16[0].startswith("rejected: TP=16 spans 2 nodes of 8 GPUs")


def test_json_is_one_object_with_the_layout_fields():
    result = run("--model", "llama-3.1-8b", "--gpus", "8", "--context", "65536",
                 "--workload", "prefill", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert LAYOUT_KEYS <= set(payload["chosen"])
    assert payload["chosen"]["valid"] is True and payload["chosen"]["why"]
    assert len(payload["candidates"]) == 20  # 8 = 2^3 split over 4 degrees: C(6, 3)
    for cand in payload["candidates"]:
        assert LAYOUT_KEYS <= set(cand)
        assert cand["tp"] * cand["ulysses"] * cand["ring"] * cand["pp"] == 8
    best = min((c for c in payload["candidates"] if c["valid"]),
               key=lambda c: c["prefill_seconds"])
    assert best["prefill_seconds"] == payload["chosen"]["prefill_seconds"]


def test_forced_layout_is_evaluated():
    result = run("--model", "llama-3.1-8b", "--gpus", "8", "--context", "4096",
                 "--tp", "4", "--ulysses", "1", "--ring", "2", "--pp", "1", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["candidates"]) == 1
    chosen = payload["chosen"]
    assert (chosen["tp"], chosen["ulysses"], chosen["ring"], chosen["pp"]) == (4, 1, 2, 1)


def test_partly_forced_layout_constrains_the_search():
    result = run("--model", "llama-3.1-8b", "--gpus", "8", "--context", "4096", "--tp", "2",
                 "--json")
    payload = json.loads(result.stdout)
    assert all(c["tp"] == 2 for c in payload["candidates"]) and payload["chosen"]["tp"] == 2


def test_invalid_forced_layout_exits_with_its_reasons():
    result = run("--model", "llama-3.1-70b", "--gpus", "16", "--context", "4096",
                 "--tp", "16", "--ulysses", "1", "--ring", "1", "--pp", "1")
    assert result.exit_code == 1
    assert "TP=16 spans 2 nodes of 8 GPUs" in result.stderr
    assert "Traceback" not in result.output


def test_nothing_fits_exits_nonzero_with_a_suggestion():
    result = run("--model", "llama-3.1-70b", "--gpus", "1", "--context", "4096", "--json")
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["chosen"] is None and "would fit" in payload["error"]
    assert "would fit" in result.stderr


def test_bad_input_is_one_clear_line():
    result = run("--model", "no-such-model", "--gpus", "2", "--context", "1000")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("Error: unknown model 'no-such-model'")
    assert "Traceback" not in result.output
    result = run("--model", "smollm2-135m", "--gpus", "2", "--context", "lots")
    assert result.exit_code == 2 and "is not a token count" in result.stderr
    result = run("--model", "smollm2-135m", "--gpus", "2", "--context", "100",
                 "--hardware", "tpu-v9")
    assert result.exit_code == 1 and "unknown hardware 'tpu-v9'" in result.stderr


def test_local_model_folder_and_preset(tmp_path: Path):
    (tmp_path / "config.json").write_text(
        '{"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, '
        '"num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256}')
    result = run("--model", str(tmp_path), "--gpus", "2", "--hardware", "cpu",
                 "--context", "100", "--preset", "long-ulysses", "--json")
    assert result.exit_code == 0, result.output
    chosen = json.loads(result.stdout)["chosen"]
    assert (chosen["tp"], chosen["ulysses"], chosen["ring"]) == (1, 2, 1)


def test_plot_writes_a_png(tmp_path: Path):
    target = tmp_path / "plan.png"
    result = run("--model", "llama-3.1-8b", "--gpus", "8", "--context", "32K",
                 "--plot", str(target))
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert target.stat().st_size > 10_000


def test_presets_command_lists_names_and_descriptions():
    result = CliRunner().invoke(presets_command, [])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "description"] and set(lines[1].strip()) == {"─"}
    rows: list[list[str]] = []
    for line in lines[2:]:
        if line[:1].isspace():  # a long description wrapped onto the next line
            rows[-1][1] += " " + line.strip()
        else:
            rows.append(line.rstrip().split(None, 1))
    names = [name for name, _ in rows]
    assert {"auto", "latency-tp", "long-ulysses", "million-ring", "hybrid-node"} <= set(names)
    assert [tuple(row) for row in rows] == [tuple(entry) for entry in list_presets()]
    shown = CliRunner().invoke(presets_command, ["million-ring"])
    assert shown.exit_code == 0 and "ring_mode: auto" in shown.stdout
    missing = CliRunner().invoke(presets_command, ["nope"])
    assert missing.exit_code == 1 and "unknown preset 'nope'" in missing.stderr


def test_a_quantised_kv_cache_shows_the_layouts_it_frees():
    """Llama-3.1-70B at 1M tokens on 16 H100s: an int8 cache halves the per-token KV bytes
    ((d + 4)/2d of bf16's, a scale per token and head), so layouts with fewer ranks per
    sequence fit; the plan names them, and its memory per device is what the formula gives."""
    plain = json.loads(run("--model", "llama-3.1-70b", "--gpus", "16", "--context", "1M", "--json").stdout)
    result = run("--model", "llama-3.1-70b", "--gpus", "16", "--context", "1M", "--kv-dtype", "int8", "--json")
    int8 = json.loads(result.stdout)
    valid = lambda payload: {(c["tp"], c["ulysses"], c["ring"], c["pp"]) for c in payload["candidates"] if c["valid"]}  # noqa: E731
    assert valid(plain) < valid(int8) and "tp=2 ring=8" in int8["freed_by_kv_dtype"]
    assert len(int8["freed_by_kv_dtype"]) == len(valid(int8) - valid(plain))
    same = [(a, b) for a in plain["candidates"] for b in int8["candidates"]
            if (a["tp"], a["ulysses"], a["ring"], a["pp"]) == (b["tp"], b["ulysses"], b["ring"], b["pp"]) == (4, 1, 4, 1)]
    ((a, b),) = same
    assert b["kv_cache_gib"] == pytest.approx(a["kv_cache_gib"] * (128 + 4) / (2 * 128), rel=1e-6)
    text = run("--model", "llama-3.1-70b", "--gpus", "16", "--context", "1M", "--kv-dtype", "int8").stdout
    assert "with the KV cache as int8, 7 layout(s) fit that do not with the model's dtype: " in text


def test_elastic_trace_predicts_a_servers_throughput_on_the_chosen_layout():
    """A trace whose median is --context: the idle rule (fewest ranks within 5% of the fastest)
    puts long prompts on every rank, the loaded one (cheapest in rank-seconds within 2x of the
    fastest) most on fewer; neither serves fewer requests than every request on all ranks."""
    result = run("--model", "llama-3.1-8b", "--gpus", "8", "--context", "64K", "--ulysses", "8",
                 "--elastic-trace", "1M", "--json")
    assert result.exit_code == 0, result.output
    trace = json.loads(result.output)["elastic_trace"]
    assert trace["requests"] == 200 and trace["longest_tokens"] == 1 << 20
    assert abs(trace["median_tokens"] - 65536) < 0.05 * 65536
    assert trace["elastic_over_fixed"] >= 1.0 and trace["loaded"] > trace["elastic_over_fixed"]
    assert sum(trace["degrees"].values()) == 200 and set(trace["degrees"]) <= {"1", "2", "4", "8"}
    shown = run("--model", "llama-3.1-8b", "--gpus", "8", "--context", "64K", "--ulysses", "8", "--elastic-trace", "1M")
    assert f"{trace['elastic_over_fixed']:.2f}x" in shown.output
    refused = run("--model", "llama-3.1-8b", "--gpus", "8", "--context", "64K", "--tp", "8", "--elastic-trace", "1M")
    assert refused.exit_code != 0 and "ulysses x ring > 1" in refused.output
