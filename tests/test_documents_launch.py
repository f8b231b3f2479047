"""Each document format summarised through the CLI at world 1 (in process) and on 2 ranks
(`deepspeed --num_gpus 2`, ring=2 for SmolLM2's 9 heads): the same summary, the same sections."""
import json

import pytest
from click.testing import CliRunner

import document_files as make
from document_files import SENTENCES
from helpers import BIN, REPO, demo_folder, free_port, launch
from toolkit.cli import cli

COMMON = ["--max-new-tokens", "8", "--json"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    pages = [f"{SENTENCES[n % 6]} {SENTENCES[(n + 1) % 6]} Page {n + 1} closes the entry." for n in range(8)]
    folder = d / "minutes"
    folder.mkdir()
    (folder / ".gitignore").write_text("*.tmp\n")
    (folder / "scratch.tmp").write_text("left out")
    (folder / "NOTES").write_text("\n\n".join(SENTENCES[:3]))
    make.pdf(folder / "march.pdf", [" ".join(SENTENCES[3:])])
    return {
        "pdf-map-reduce": (make.pdf(d / "report.pdf", pages), ["--max-context", "256"]),
        "docx": (make.docx(d / "minutes.docx", "Minutes", [("Opening", SENTENCES[:3]), ("Costs", SENTENCES[3:])]), []),
        "epub": (make.epub(d / "book.epub", "The harbour", [("Spring", SENTENCES[:3]), ("Winter", SENTENCES[3:])]), []),
        "html": (_write(d / "page.html", make.html_page("News", "The breakwater", SENTENCES)), []),
        "text-no-suffix": (_write(d / "LICENSE", "\n\n".join(SENTENCES)), []),
        "folder": (folder, []),
    }


def _write(path, text):
    path.write_text(text)
    return path


CASES = ["pdf-map-reduce", "docx", "epub", "html", "text-no-suffix", "folder"]


@pytest.fixture(scope="module")
def on_2_ranks(inputs):
    """Every case through the CLI on 2 ranks under one deepspeed launch: case -> its JSON."""
    runs = [[str(inputs[case][0]), list(inputs[case][1])] for case in CASES]
    cmd = [BIN / "deepspeed", "--master_port", free_port(), "--num_gpus", 2, REPO / "tests" / "scripts" /
           "summarize_each.py", json.dumps(runs), "--", "--model", demo_folder(), *COMMON]
    found = [json.loads(line) for line in launch(cmd).stdout.splitlines() if line.startswith("{")]
    assert len(found) == len(CASES), found
    return dict(zip(CASES, found))


@pytest.mark.parametrize("case", CASES)
def test_each_format_summarises_the_same_at_world_1_and_on_2_ranks(inputs, on_2_ranks, case):
    path, extra = inputs[case]
    args = [str(path), "--model", demo_folder(), *COMMON, *extra]
    single = CliRunner().invoke(cli, ["summarize", *args])
    assert single.exit_code == 0, single.output
    one = json.loads(single.stdout)
    two = on_2_ranks[case]
    assert two["layout"]["ring"] == 2 and one["layout"]["ring"] == 1
    for key in ("summary", "mode", "kind", "sections", "section_summaries", "document_tokens", "prompt_tokens",
                "new_tokens"):
        assert one[key] == two[key], key
    if case == "pdf-map-reduce":
        assert one["mode"] == "map-reduce" and len(one["sections"]) >= 2 and one["pages"] == list(range(1, 9))
        covered = [p for s in one["sections"] for p in range(s["pages"][0], s["pages"][1] + 1)]
        assert covered == list(range(1, 9))  # whole pages, in order, each once
    if case == "folder":
        assert one["files"] == ["NOTES", "march.pdf"] and one["sections"][0]["files"] == ["NOTES", "march.pdf"]
