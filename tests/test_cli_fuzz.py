"""A fuzz pass over the CLI's inputs: random bytes as a document, random flag values. Every
run ends in one line on stderr and exit code 1 or 2, never a traceback. (The model path
does not exist, so no run gets as far as loading weights.)"""
import json

import pytest

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.cli import cli

FLAGS = ["--chunk-size", "--max-new-tokens", "--tp", "--ulysses", "--ring", "--pp", "--dtype", "--preset",
         "--timeout", "--max-context", "--repetition-penalty"]


def _check(result):
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2000))
def test_random_bytes_as_a_document(tmp_path, data):
    doc = tmp_path / "doc.md"
    doc.write_bytes(data)
    _check(CliRunner().invoke(cli, ["summarize", str(doc), "--model", str(tmp_path / "no-model")]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(FLAGS), value=st.one_of(st.integers(-10**6, 10**6).map(str), st.text(max_size=12)))
def test_random_flag_values(tmp_path, flag, value):
    doc = tmp_path / "doc.md"
    doc.write_text("A short document.\n")
    _check(CliRunner().invoke(cli, ["summarize", str(doc), flag, value, "--model", str(tmp_path / "no-model")]))


@pytest.mark.parametrize("family, architecture", [("gpt2", "GPT2LMHeadModel"), ("mamba", "MambaForCausalLM")])
def test_unsupported_architecture_lists_the_supported_ones(tmp_path, family, architecture):
    """Refused from config.json alone: the folder has no weights to read."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": family, "architectures": [architecture]}))
    doc = tmp_path / "doc.md"
    doc.write_text("A short document.\n")
    result = CliRunner().invoke(cli, ["summarize", str(doc), "--model", str(tmp_path)])
    _check(result)
    assert (f"model type '{family}' is not supported; supported: llama, mistral, qwen2, qwen3, phi3, mixtral, "
            "qwen3_moe, gemma2, gemma3_text") in result.stderr


def test_preset_with_a_yaml_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("description: broken\ntp: [1, 2\n")
    doc = tmp_path / "doc.md"
    doc.write_text("A short document.\n")
    result = CliRunner().invoke(cli, ["summarize", str(doc), "--preset", str(bad)])
    _check(result)
    assert "bad.yaml" in result.stderr and "line" in result.stderr
