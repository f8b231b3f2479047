"""`lctk summarize`: a long document in, its summary out (one pass or map-reduce)."""
from __future__ import annotations

import json

import click

from ..documents import write_atomic
from ..summarize import DEFAULT_REPETITION_PENALTY
from ..summarize.mapreduce import summarize_in_session
from .progress import ProgressBar, TokenPrinter, cut_note
from .flags import declared
from .inputs import check_output_path, document_options, read_input
from .support import check_preset, command_output, document_context, model_options, open_model, run_report


def as_markdown(result, source: str) -> str:
    """The summary under a heading and, after map-reduce, each section's summary under its place."""
    lines = [f"# Summary of {source}", "", result.summary]
    if result.mode == "map-reduce":
        lines += ["", "## Sections", ""]
        for section, summary in zip(result.sections, result.section_summaries):
            place = section.place()
            lines.append(f"- **{section.title}**{f' ({place})' if place and place != section.title else ''}: "
                         f"{summary}")
    return "\n".join(lines)


@click.command()
@click.argument("file", metavar="FILE|FOLDER|-")
@declared("max_new_tokens", max_new_tokens=256)
@click.option("--instruction", metavar="TEXT", help="What to ask for. [default: a short paragraph on the "
                                                    "main events, people, numbers and conclusions]")
@click.option("--max-context", type=click.IntRange(min=128), metavar="TOKENS",
              help="Treat the model's context as this many tokens: smaller sections, less memory per pass. "
                   "[default: the model's max_position_embeddings]")
@click.option("--single-pass", is_flag=True, help="Fail instead of splitting a document that does not fit.")
@declared("repetition_penalty", repetition_penalty=DEFAULT_REPETITION_PENALTY)
@click.option("--output", "-o", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the summary (in --format) to FILE atomically; nothing goes to stdout.")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json"]), default="text", show_default=True,
              help="text: the summary; markdown: it and each section's summary under its title and pages or "
                   "files; json: one object with summary, sections, token counts, layout and timings.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--resume", is_flag=True, help="Reuse the section summaries a crashed or stopped run finished "
                                             "(same model, document and settings); recompute the rest.")
@click.option("--cache-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Where finished sections are kept: a new or empty directory, or one lctk keeps sections in "
                   "(any other is refused, untouched). [default: $LCTK_CACHE/sections, ~/.cache/lctk/sections]")
@click.option("--save-cache", type=click.Path(file_okay=False), metavar="DIR",
              help="Keep the document's prefilled cache in DIR, to question it next with `lctk ask --cache DIR` "
                   "(a document read in one pass).")
@document_options
@model_options
def summarize(file, max_new_tokens, instruction, max_context, single_pass, repetition_penalty, output, fmt, as_json,
              resume, cache_dir, save_cache, pages, max_pages, include, exclude, max_document_bytes, follow_symlinks,
              **opts):
    """Summarise FILE, a FOLDER of files, or stdin (`-`).

    FILE is read by its content, whatever its name: text (UTF-8, or UTF-16 with a BOM), PDF
    (page by page, with [page N] markers the summary can cite), HTML (the main text), DOCX or
    EPUB (chapters in order). A folder is read file by file, each introduced by its path.

    One pass when the document fits the model's context; otherwise map-reduce: sections cut at
    the document's files, chapters, headings and pages are summarised one by one (every rank
    working on each), then their summaries are summarised. Progress goes to stderr, the summary
    to stdout.
    """
    fmt = "json" if as_json else fmt
    check_output_path(output)
    if save_cache:
        from ..sessions.store import check_target

        check_target(save_cache)  # a folder lctk did not write is refused here, untouched
    else:
        from ..summarize.section_cache import default_cache_dir, section_folder_problem

        problem = section_folder_problem(cache_dir or default_cache_dir())
        if problem:
            raise ValueError(problem)
    check_preset(opts)
    document = read_input(file, opts["timeout_s"], pages, max_pages, include, exclude, max_document_bytes,
                          follow_symlinks)
    with command_output(opts["debug"]) as out:
        lcm = open_model(opts, document_context(opts, len(document.text), max_context))
        main = lcm.topo.is_main
        if main:  # what a folder left out was said when it was read (read_input)
            click.echo(f"lctk: read {document.description}", err=True)
        progress = ProgressBar(main)
        printer = TokenPrinter(lcm.tokenizer, out, strip=True) if main and fmt == "text" and not output else None
        if save_cache:
            result, session = summarize_in_session(lcm, document, max_new_tokens, instruction=instruction,
                                                   on_token=printer, on_chunk=progress.chunk, max_context=max_context,
                                                   repetition_penalty=repetition_penalty)
            progress.close()
            session.save(save_cache)
        else:
            result = lcm.summarize(document, max_new_tokens, instruction=instruction, on_progress=progress,
                                   on_token=printer, max_context=max_context, single_pass=single_pass,
                                   repetition_penalty=repetition_penalty, cache_dir=cache_dir, resume=resume)
        progress.close()
        report = run_report(lcm)
        if not main:
            return
        if printer is not None:  # the streamed summary's line ends before the status line starts
            printer.finish(result.summary, result.finish_reason, max_new_tokens)
        else:
            note = cut_note(result.finish_reason, max_new_tokens)
            if note:
                click.echo(note, err=True)
        click.echo(f"lctk: {result.mode} summary: {len(result.sections)} section(s), {result.levels} map level(s), "
                   f"{result.document_tokens} document tokens, {result.prompt_tokens} tokens prefilled, "
                   f"{result.timings['total_s']:.1f} s", err=True)
        if fmt == "json":
            payload = {"summary": result.summary, "mode": result.mode, "kind": document.kind,
                       "sections": [s.to_dict() for s in result.sections], "levels": result.levels,
                       "document_tokens": result.document_tokens, "prompt_tokens": result.prompt_tokens,
                       "new_tokens": result.new_tokens, "section_summaries": result.section_summaries,
                       "finish_reason": result.finish_reason,
                       "model": opts["model"], "timings": result.timings, **report}
            if document.files:
                payload["files"] = list(document.files)
            if document.pages:
                payload["pages"] = list(document.pages)
            rendered = json.dumps(payload, ensure_ascii=False)
        elif fmt == "markdown":
            rendered = as_markdown(result, "standard input" if file == "-" else file)
        else:
            rendered = result.summary
        if output:
            write_atomic(output, rendered + "\n")
            click.echo(f"lctk: summary written to {output}", err=True)
        elif printer is None:
            out.write(rendered + "\n")
        if save_cache:
            click.echo(f"lctk: the document's cache is in {save_cache}: question it with "
                       f"`lctk ask {file} -q QUESTION --cache {save_cache}`", err=True)
