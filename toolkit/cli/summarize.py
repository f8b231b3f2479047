"""`lctk summarize`: a long document in, its summary out (one pass or map-reduce)."""
from __future__ import annotations

import json

import click

from ..summarize import DEFAULT_REPETITION_PENALTY, SUPPORTED_SUFFIXES, write_atomic
from .progress import ProgressBar, TokenPrinter
from .support import (check_output_path, check_preset, command_output, document_context, model_options, open_model,
                      read_input, run_report)


@click.command()
@click.argument("file", metavar="FILE|-")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True, metavar="N",
              help="Length of the summary, and of each section's summary in map-reduce.")
@click.option("--instruction", metavar="TEXT", help="What to ask for. [default: a short paragraph on the "
                                                    "main events, people, numbers and conclusions]")
@click.option("--max-context", type=click.IntRange(min=128), metavar="TOKENS",
              help="Treat the model's context as this many tokens: smaller sections, less memory per pass. "
                   "[default: the model's max_position_embeddings]")
@click.option("--single-pass", is_flag=True, help="Fail instead of splitting a document that does not fit.")
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_REPETITION_PENALTY, show_default=True,
              help="Greedy decoding with this penalty on repeated tokens (small models loop without it); "
                   "1.0: plain greedy.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the summary (or the JSON object) to FILE atomically; nothing goes to stdout.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: summary, mode, sections, token "
                                                      "counts, layout, timings.")
@click.option("--resume", is_flag=True, help="Reuse the section summaries a crashed or stopped run finished "
                                             "(same model, document and settings); recompute the rest.")
@click.option("--cache-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Where finished sections are kept. [default: $LCTK_CACHE/sections, ~/.cache/lctk/sections]")
@model_options
def summarize(file, max_new_tokens, instruction, max_context, single_pass, repetition_penalty, output, as_json,
              resume, cache_dir, **opts):
    """Summarise FILE (.txt or .md; `-` reads stdin).

    One pass when the document fits the model's context; otherwise map-reduce: sections cut
    on paragraph and heading boundaries are summarised one by one (every rank working on each),
    then their summaries are summarised. Progress goes to stderr, the summary to stdout.
    """
    check_output_path(output)
    check_preset(opts)
    text = read_input(file, SUPPORTED_SUFFIXES, opts["timeout_s"])
    with command_output(opts["debug"]) as out:
        lcm = open_model(opts, document_context(opts, len(text), max_context))
        main = lcm.topo.is_main
        progress = ProgressBar(main)
        printer = TokenPrinter(lcm.tokenizer, out, strip=True) if main and not (as_json or output) else None
        result = lcm.summarize(text, max_new_tokens, instruction=instruction, on_progress=progress,
                               on_token=printer, max_context=max_context, single_pass=single_pass,
                               repetition_penalty=repetition_penalty, cache_dir=cache_dir, resume=resume)
        progress.close()
        report = run_report(lcm)
        if not main:
            return
        click.echo(f"lctk: {result.mode} summary: {result.sections} section(s), {result.levels} map level(s), "
                   f"{result.document_tokens} document tokens, {result.prompt_tokens} tokens prefilled, "
                   f"{result.timings['total_s']:.1f} s", err=True)
        payload = {"summary": result.summary, "mode": result.mode, "sections": result.sections,
                   "levels": result.levels, "document_tokens": result.document_tokens,
                   "prompt_tokens": result.prompt_tokens, "new_tokens": result.new_tokens,
                   "section_summaries": result.section_summaries, "model": opts["model"],
                   "timings": result.timings, **report}
        if output:
            write_atomic(output, json.dumps(payload, ensure_ascii=False) + "\n" if as_json else result.summary + "\n")
            click.echo(f"lctk: summary written to {output}", err=True)
        elif as_json:
            out.write(json.dumps(payload, ensure_ascii=False) + "\n")
        else:
            printer.finish(result.summary)
