"""No lost work: a map-reduce summarisation that crashes at section 2 resumes from its cache."""
import re

import pytest
from click.testing import CliRunner

from helpers import demo_folder
from toolkit import LongContextModel
from toolkit.cli import cli
from toolkit.summarize.synthetic import station_logbook


class Crash(Exception):
    pass


def test_resume_reuses_finished_sections_and_recomputes_nothing_finished(tmp_path):
    lcm = LongContextModel.from_pretrained(demo_folder(), chunk_size=128)
    text = station_logbook(days=14)  # ~820 tokens; a 320-token context forces >= 3 sections
    settings = dict(max_new_tokens=8, max_context=320)
    events = []

    def crash_at_section_2(p):
        if p.stage == "map" and p.section == 2 and p.chunk == 0 and not p.done:
            raise Crash()

    with pytest.raises(Crash):
        lcm.summarize(text, cache_dir=tmp_path / "cache", on_progress=crash_at_section_2, **settings)
    resumed = lcm.summarize(text, cache_dir=tmp_path / "cache", resume=True, on_progress=events.append, **settings)
    finished = [p for p in events if p.stage == "map" and p.done]
    assert [p.cached for p in finished] == [True] + [False] * (len(finished) - 1), "only section 1 was done before"
    fresh = lcm.summarize(text, cache_dir=tmp_path / "other", **settings)
    assert resumed.summary == fresh.summary and resumed.section_summaries == fresh.section_summaries

    # the CLI flag: every section now comes back from the cache, only the reduce step runs
    doc = tmp_path / "log.md"
    doc.write_text(text)
    result = CliRunner().invoke(cli, ["summarize", str(doc), "--model", demo_folder(), "--max-new-tokens", "8",
                                      "--max-context", "320", "--chunk-size", "128", "--resume",
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    reread = re.findall(r"section (\d+)/(\d+) read back from the section cache", result.stderr)
    assert len(reread) == len(finished) and "done (" not in result.stderr
    assert result.stdout.strip() == fresh.summary
