"""The `lctk` CLI in one process (world size 1) through click's runner: help, info, bad
input (one line, no traceback, before any weight loads), generate and summarize."""
import json
import re

import pytest
from click.testing import CliRunner

from helpers import PROMPT, demo_folder, hf_greedy, one_error_line
from toolkit.cli import cli
from toolkit.documents import DocumentError
from toolkit.summarize.synthetic import station_logbook


def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def test_help_lists_every_command_and_each_command_has_help():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("summarize", "ask", "serve", "generate", "info", "plan", "presets"):
        assert command in result.stdout
        assert invoke(command, "--help").exit_code == 0


def test_info_json_reports_versions_backend_world_and_optional_parts():
    result = invoke("info", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"python", "torch", "transformers", "deepspeed", "accelerate", "lctk"} <= set(report["versions"])
    assert report["backend"] in ("nccl", "gloo", "none") and report["devices"]
    assert report["world"] == 1 and report["rank"] == 0 and "gguf" in report["optional"]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.md").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\n \t\n")
    (tmp_path / "binary.md").write_bytes(b"# title\n\x00\x01\x02 data")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "ok.md").write_text(station_logbook(days=2))
    return tmp_path


@pytest.mark.parametrize("args, code, words", [
    (["summarize", "{d}/missing.md"], 2, "does not exist"),
    (["summarize", "{d}/empty.md"], 2, "is empty"),
    (["summarize", "{d}/blank.txt"], 2, "is empty"),
    (["summarize", "{d}/binary.md"], 2, "binary"),
    (["summarize", "{d}/latin1.txt"], 2, "not UTF-8"),
    (["summarize", "{d}/doc.pdf"], 2, "is not a readable PDF"),
    (["summarize", "{d}", "--include", "*.none"], 2, "has no readable documents"),
    (["summarize", "{d}/ok.md", "--chunk-size", "0"], 2, "--chunk-size"),
    (["summarize", "{d}/ok.md", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    (["summarize", "{d}/ok.md", "--model", "{m}", "--pp", "2"], 1, "does not divide the world of 1"),
    (["summarize", "{d}/ok.md", "--model", "{m}", "--ring", "2"], 1, "must multiply to the world size 1"),
    (["summarize", "{d}/ok.md", "--output", "{d}/no/such/dir/out.txt"], 2, "does not exist"),
    (["summarize", "{d}/ok.md", "--model", "{d}/no-model"], 1, "does not exist"),
    (["summarize", "{d}/ok.md", "--model", "{d}"], 1, "not a model folder"),
    (["summarize", "{d}/ok.md", "--preset", "no-such-preset"], 1, "unknown preset"),
    (["summarize", "{d}/ok.md", "--dtype", "int3"], 2, "--dtype"),
    (["generate"], 2, "exactly one of --prompt"),
    (["generate", "--prompt", "x", "--prompt-file", "{d}/ok.md"], 2, "exactly one of --prompt"),
    (["generate", "--prompt", ""], 2, "prompt is empty"),
    (["generate", "--prompt-file", "{d}/binary.md"], 2, "binary"),
    (["generate", "--prompt", "x", "--greedy", "--temperature", "0.7"], 2, "--greedy"),
    (["generate", "--prompt", "x", "--temperature", "0"], 2, "--temperature"),
    (["no-such-command"], 2, "No such command"),
])
def test_bad_input_is_one_line_without_traceback(files, args, code, words):
    result = invoke(*[a.format(d=files, m=demo_folder()) for a in args])
    line = one_error_line(result)
    assert result.exit_code == code, result.output
    assert words in line


def test_cuda_graph_without_a_cuda_device_is_one_line_before_the_model_is_read(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    line = one_error_line(invoke("generate", "--prompt", "x", "--model", tmp_path / "no-model", "--cuda-graph"))
    assert "CUDA device" in line and "drop it" in line


def test_elastic_serving_with_pipeline_stages_is_one_line_before_the_model_is_read(tmp_path):
    line = one_error_line(invoke("serve", "--model", tmp_path / "no-model", "--pp", 2, "--elastic"))
    assert "--elastic" in line and "pp=2" in line and "--no-elastic" in line


def test_debug_shows_the_exception():
    result = invoke("summarize", "/no/such/file.md", "--debug")
    assert isinstance(result.exception, DocumentError)


def test_generate_json_equals_hf_greedy_tokens():
    result = invoke("generate", "--model", demo_folder(), "--prompt", PROMPT, "--max-new-tokens", 12,
                    "--chunk-size", 4, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)  # exactly one JSON object: json.loads refuses anything more
    assert set(payload) == {"text", "token_ids", "prompt_tokens", "finish_reason", "layout", "timings", "load_s",
                            "peak_host_rss_bytes", "peak_device_bytes"}
    assert payload["finish_reason"] == "length"
    assert payload["token_ids"] == list(hf_greedy(PROMPT, 12))
    assert payload["layout"] == {"tp": 1, "ulysses": 1, "ring": 1, "pp": 1, "dtype": "float32"}
    assert 0 < payload["load_s"] < 600
    # the weights alone are ~540 MB in fp32; a process holding them has at least that much resident
    assert payload["peak_host_rss_bytes"] > 500 * 2**20 and payload["peak_device_bytes"] is None
    assert set(payload["timings"]) == {"total_s", "ttft_s", "prefill_s", "decode_s", "tokens_per_s", "speculation"}
    assert set(payload["timings"]["speculation"]) == {"drafted", "accepted", "verify_steps"}
    streamed = invoke("generate", "--model", demo_folder(), "--prompt", PROMPT, "--max-new-tokens", 12)
    assert streamed.exit_code == 0 and streamed.stdout == payload["text"] + "\n"
    # cut at its limit: the text's line ends, then stderr says so and how to get the rest
    assert "stopped at --max-new-tokens (12)" in streamed.stderr


def test_generate_refuses_a_prompt_longer_than_the_context(tmp_path):
    doc = tmp_path / "long.txt"
    doc.write_text(station_logbook(days=150))  # ~8.5K tokens > 8192 positions
    line = one_error_line(invoke("generate", "--model", demo_folder(), "--prompt-file", doc))
    assert "exceeds the model's context of 8192" in line


def test_token_printer_keeps_multibyte_characters_whole():
    import io

    from transformers import AutoTokenizer

    from toolkit.cli.progress import TokenPrinter

    tok = AutoTokenizer.from_pretrained(demo_folder())
    text = "Météo: 12 °C, ☃ and 日本語 notes"
    ids = tok(text, add_special_tokens=False).input_ids
    out = io.StringIO()
    printer = TokenPrinter(tok, out)
    for i in ids:
        printer(i)
        assert "\ufffd" not in out.getvalue()
    printer.finish(tok.decode(ids))
    assert out.getvalue() == text + "\n"


def test_summarize_single_pass_json_and_atomic_output(tmp_path):
    doc = tmp_path / "log.md"
    doc.write_text(station_logbook(days=6))
    result = invoke("summarize", doc, "--model", demo_folder(), "--max-new-tokens", 8, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["mode"] == "single" and payload["summary"].strip()
    assert payload["finish_reason"] == "length" and "stopped at --max-new-tokens (8)" in result.stderr
    title = doc.read_text().splitlines()[0].removeprefix("# ")
    assert payload["sections"] == [{"title": title, "tokens": payload["document_tokens"]}], payload["sections"]
    assert "lctk: single summary" in result.stderr
    out = tmp_path / "summary.txt"
    result = invoke("summarize", "-", "--model", demo_folder(), "--max-new-tokens", 8, "--output", out,
                    input=doc.read_text())
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and out.read_text() == payload["summary"] + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.md", "summary.txt"]  # no temp file left


def test_summarize_map_reduce_visits_every_section_and_streams_once(tmp_path):
    doc = tmp_path / "log.md"
    doc.write_text(station_logbook(days=14))  # ~820 tokens; a 320-token context forces map-reduce
    result = invoke("summarize", doc, "--model", demo_folder(), "--max-new-tokens", 8, "--max-context", 320,
                    "--chunk-size", 128)
    assert result.exit_code == 0, result.output
    done = re.findall(r"level 0 section (\d+)/(\d+) done", result.stderr)
    sections = int(done[0][1])
    assert sections >= 3 and [int(i) for i, _ in done] == list(range(1, sections + 1))
    assert result.stderr.count("lctk: map-reduce summary") == 1
    summary = result.stdout.strip()
    assert summary and result.stdout.count(summary) == 1


def test_summarize_single_pass_flag_refuses_to_split(tmp_path):
    doc = tmp_path / "log.md"
    doc.write_text(station_logbook(days=14))
    line = one_error_line(invoke("summarize", doc, "--model", demo_folder(), "--max-context", 320,
                                 "--single-pass"))
    assert "exceeds the context of 320" in line


def test_split_sections_respects_the_budget_and_keeps_headings_with_their_text():
    from transformers import AutoTokenizer

    from toolkit.documents.structure import blocks
    from toolkit.summarize import split_sections

    tok = AutoTokenizer.from_pretrained(demo_folder())
    text = station_logbook(days=20)
    sections = split_sections(tok, text, 300)
    assert len(sections) >= 3
    for section in sections:
        assert len(tok(section.text, add_special_tokens=False).input_ids) <= 300
        assert not section.text.rstrip().splitlines()[-1].startswith("#")  # no heading left at a section's end
        assert section.text.startswith("#") and section.title == section.text.splitlines()[0].lstrip("# ")
    assert [b for s in sections for b in blocks(s.text)] == blocks(text)  # nothing lost, nothing reordered


def test_preset_flags_override_it_and_tokens_stay_exact():
    result = invoke("generate", "--model", demo_folder(), "--prompt", PROMPT, "--max-new-tokens", 12,
                    "--preset", "cpu-fp32", "--chunk-size", 5, "--json")
    assert result.exit_code == 0, result.output
    assert "prefill chunks of 5 tokens, float32" in result.stderr
    assert json.loads(result.stdout)["token_ids"] == list(hf_greedy(PROMPT, 12))


def test_preflight_refuses_a_prompt_whose_cache_does_not_fit_before_loading():
    """SmolLM2-135M at its full 8192 positions: ~0.5 GiB of fp32 weights + ~0.37 GiB of KV cache
    against a 600 MiB budget: one line with the numbers, the longest prompt that fits, no traceback."""
    result = invoke("generate", "--model", demo_folder(), "--prompt", "x " * 30_000, "--max-new-tokens", 8,
                    "--memory-budget", "600MiB")
    line = one_error_line(result)
    assert "not enough memory" in line and "GiB weights" in line and "KV cache for 8,192 tokens" in line, line
    assert "but 0.59 GiB is available" in line, line  # 600 MiB
    assert "the longest prompt that fits one device is" in line, line
    fits = int(line.split("the longest prompt that fits one device is ")[1].split(" tokens")[0].replace(",", ""))
    assert 0 < fits < 8192
    assert "lctk: " not in result.stderr  # refused before the model was loaded (that line comes after)
    ok = invoke("generate", "--model", demo_folder(), "--prompt", PROMPT, "--max-new-tokens", 2,
                "--memory-budget", "600MiB", "--json")  # a short prompt fits the same budget
    assert ok.exit_code == 0, ok.output
    skipped = invoke("generate", "--model", demo_folder(), "--prompt", "x " * 30_000, "--max-new-tokens", 1,
                     "--memory-budget", "600MiB", "--no-preflight", "--chunk-size", 4096, "--json")
    assert "not enough memory" not in skipped.output


def test_planner_context_of_a_summary_is_at_most_one_pass():
    from toolkit.cli.support import document_context as _document_context

    opts = {"model": demo_folder(), "gguf_file": None, "trust_remote_code": False}
    assert _document_context(opts, 12_000, None) == 3001  # ~4 characters a token
    assert _document_context(opts, 12_000, 500) == 500
    assert _document_context(opts, 10**7, None) == 8192  # a 2.5M-token document: passes of the model's context


def test_info_table_has_a_row_per_version_backend_device_world_and_optional_part():
    result = CliRunner().invoke(cli, ["info"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout  # no colour or style codes off a terminal
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["what", "value"] and set(lines[1].strip()) == {"─"}
    rows = [tuple(line.rstrip().split(None, 1)) for line in lines[2:]]
    assert all(len(row) == 2 for row in rows) and len(rows) == len(lines) - 2
    report = json.loads(CliRunner().invoke(cli, ["info", "--json"]).stdout)
    assert {"versions", "backend", "devices", "world", "optional"} <= set(report)
    for package in ("torch", "transformers", "deepspeed"):
        assert (package, report["versions"][package]) in rows
    assert ("backend", report["backend"]) in rows
    assert [value for what, value in rows if what == "device"] == report["devices"]
    assert ("world", "1 (rank 0, local rank 0, 1 per node)") in rows
    assert ("optional", f"gguf: {'yes' if report['optional']['gguf'] else 'no'}") in rows
    assert sum(what == "optional" for what, _ in rows) == len(report["optional"])
