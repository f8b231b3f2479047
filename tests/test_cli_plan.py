"""`lctk plan` and `lctk presets`, invoked as standalone click commands."""
import json
from pathlib import Path

from click.testing import CliRunner

from toolkit.cli.plan import plan_command
from toolkit.cli.presets import presets_command

LAYOUT_KEYS = {"tp", "ulysses", "ring", "pp", "valid", "reasons", "memory_gib_per_device",
               "prefill_seconds", "decode_ms_per_token"}


def run(*args: str):
    return CliRunner().invoke(plan_command, list(args))


def test_table_marks_the_chosen_layout_and_rejected_reasons():
    result = run("--model", "llama-3.1-70b", "--gpus", "16", "--context", "128K")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "131,072 prompt tokens" in lines[0]
    assert sum(line.startswith("*") for line in lines) == 1
    assert any("rejected: tensor parallel size 16 does not divide 8 KV heads" in line
               for line in lines)
    assert any(line.startswith("chosen: ") for line in lines)


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
    assert "tensor parallel size 16 does not divide 8 KV heads; valid sizes: 1, 2, 4, 8" \
        in result.stderr
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
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"auto", "latency-tp", "long-ulysses", "million-ring", "hybrid-node"} <= set(names)
    shown = CliRunner().invoke(presets_command, ["million-ring"])
    assert shown.exit_code == 0 and "ring_mode: auto" in shown.stdout
    missing = CliRunner().invoke(presets_command, ["nope"])
    assert missing.exit_code == 1 and "unknown preset 'nope'" in missing.stderr
