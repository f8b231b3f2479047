"""Real launches with 2 ranks: `deepspeed --num_gpus 2 launch/run.py` and `torchrun` (CPU
ranks over gloo here), plus the examples as written. Each run has a hard deadline."""
import json
import sys

import pytest

from helpers import PROMPT, REPO, deepspeed, demo_folder, free_port, hf_greedy, launch, only_json, torchrun
from toolkit.summarize.synthetic import station_logbook

sys.path.insert(0, str(REPO / "launch"))
from run import strip_local_rank  # noqa: E402

@pytest.mark.parametrize("launcher, degrees, layout", [
    (deepspeed, [], {"tp": 1, "ulysses": 1, "ring": 2, "pp": 1, "dtype": "float32"}),  # 9 heads: ring on 2 ranks
    (torchrun, [], {"tp": 1, "ulysses": 1, "ring": 2, "pp": 1, "dtype": "float32"}),
    (torchrun, ["--pp", "2"], {"tp": 1, "ulysses": 1, "ring": 1, "pp": 2, "dtype": "float32"}),
], ids=["deepspeed", "torchrun", "torchrun-pp2"])
def test_generate_json_on_2_ranks_equals_hf_greedy(launcher, degrees, layout):
    proc = launch(launcher("generate", "--model", demo_folder(), "--prompt", PROMPT, "--max-new-tokens", 10,
                           "--chunk-size", 4, "--json", *degrees))
    payload = only_json(proc.stdout)
    assert payload["layout"] == layout
    assert payload["token_ids"] == list(hf_greedy(PROMPT, 10))
    assert proc.stderr.count("lctk: ") == 1  # rank 0's load line; rank 1 says nothing


def test_deepspeed_example_map_reduces_a_document_longer_than_the_context(tmp_path):
    doc = tmp_path / "logbook.md"
    doc.write_text(station_logbook(days=150))  # ~8.5K tokens > SmolLM2's 8192 positions
    proc = launch([REPO / "examples" / "summarize_deepspeed.sh", doc, "--model", demo_folder(),
                   "--max-new-tokens", 12, "--chunk-size", 2048, "--json"], MASTER_PORT=str(free_port()))
    payload = only_json(proc.stdout)
    assert payload["mode"] == "map-reduce" and payload["document_tokens"] > 8192
    # the largest of the 2 ranks: at least the ~0.5 GB of fp32 weights each holds (ring: all of them)
    assert payload["load_s"] > 0 and payload["peak_host_rss_bytes"] > 500 * 2**20
    sections = len(payload["sections"])
    assert sections >= 2 and len(payload["section_summaries"]) == sections
    assert sum(s["tokens"] for s in payload["sections"]) >= payload["document_tokens"] * 0.95
    assert all(s.strip() for s in payload["section_summaries"]) and payload["summary"].strip()
    for i in range(1, sections + 1):  # every section visited, each reported once (rank 0 only)
        assert proc.stderr.count(f"level 0 section {i}/{sections} done") == 1
    assert proc.stderr.count("lctk: map-reduce summary") == 1


def test_accelerate_example_runs_the_python_api_on_2_ranks():
    proc = launch([REPO / "examples" / "accelerate_launch.sh", 2, demo_folder()])
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("layout {'tp': 1, 'ulysses': 1, 'ring': 2") for line in lines) == 1
    assert sum(line.startswith("summary (single") for line in lines) == 1


def test_plain_python_launch_and_demo_document(tmp_path):
    proc = launch([sys.executable, "launch/run.py", "--local_rank=0", "info", "--json"], timeout=120)
    assert json.loads(proc.stdout)["world"] == 1
    proc = launch([sys.executable, "examples/make_demo_document.py"], timeout=60)
    assert proc.stdout.startswith("# Logbook") and len(proc.stdout) > 8000
    launch([sys.executable, "examples/make_demo_document.py", "--pdf", tmp_path / "demo.pdf"], timeout=60)
    from toolkit.documents import read_document

    pdf = read_document(tmp_path / "demo.pdf")  # what `make demo` summarises
    assert pdf.kind == "pdf" and len(pdf.pages) >= 3 and pdf.text.startswith("[page 1]\nLogbook")


def test_strip_local_rank_handles_both_spellings():
    assert strip_local_rank(["--local_rank=3", "info"]) == (["info"], "3")
    assert strip_local_rank(["info", "--local_rank", "1", "--json"]) == (["info", "--json"], "1")
    assert strip_local_rank(["--local-rank=2", "generate"]) == (["generate"], "2")
    assert strip_local_rank(["generate", "--prompt", "x"]) == (["generate", "--prompt", "x"], None)
