"""`lctk ask`: prefill a document once (or load its saved cache), then answer each question
after it, streaming; the cache can be kept on disk for the next run, on any layout."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .progress import ProgressBar, TokenPrinter, cut_note
from .inputs import document_options, read_input
from .flags import declared
from .support import check_preset, command_output, document_context, model_options, open_model, run_report


def read_questions(questions, questions_file) -> list[str]:
    found = [q for q in questions if q.strip()]
    if questions_file:
        source = click.get_text_stream("stdin") if questions_file == "-" else None
        try:
            text = source.read() if source else Path(questions_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise click.UsageError(f"--questions-file {questions_file} cannot be read ({type(err).__name__}); "
                                   "give a UTF-8 file with one question per line") from None
        found += [line.strip() for line in text.splitlines() if line.strip()]
    if not found:
        raise click.UsageError("give at least one question: -q 'question' (repeatable) or --questions-file FILE")
    return found


def open_session(lcm, text: str, cache: str | None, progress):
    """(session, what happened to --cache): the saved cache when it fits model and document, else a prefill."""
    from ..sessions import CacheError

    status = {"path": cache, "loaded": False, "why": None}
    if cache and (Path(cache) / "manifest.json").exists():
        try:
            session = lcm.load_document(cache, document=text)
            status["loaded"] = True
            return session, status
        except CacheError as err:
            status["why"] = str(err)
    elif cache:
        status["why"] = f"no cache in {cache} yet"
    if lcm.topo.is_main and status["why"]:
        click.echo(f"lctk: {status['why']}; prefilling the document", err=True)
    return lcm.prefill_document(text, on_chunk=progress.chunk), status


def answer_streaming(session, question: str, max_new_tokens: int, repetition_penalty: float, out, as_json: bool,
                     several: bool):
    """One question, its tokens streamed to `out` (rank 0's stdout, or None) as they come."""
    printer = TokenPrinter(session.lcm.tokenizer, out, strip=True) if out is not None and not as_json else None
    if printer is not None and several:
        out.write(f"> {question}\n")
    result = session.ask(question, max_new_tokens, repetition_penalty=repetition_penalty, on_token=printer)
    if printer is not None:
        printer.finish(result.text.strip(), result.finish_reason, max_new_tokens)
        if several:
            out.write("\n")
    return result


@click.command()
@click.argument("document", metavar="FILE|FOLDER|-")
@click.option("--question", "-q", "questions", multiple=True, metavar="TEXT", help="A question (repeatable).")
@click.option("--questions-file", metavar="FILE|-", help="More questions, one per line.")
@declared("max_new_tokens", "repetition_penalty", max_new_tokens=256, repetition_penalty=1.0)
@click.option("--cache", "cache", type=click.Path(file_okay=False), metavar="DIR",
              help="Load the document's saved cache from DIR when it fits this model and document; "
                   "otherwise prefill and save it there for next time. DIR is new, empty or a cache lctk "
                   "saved: any other folder is refused, untouched.")
@click.option("--save-cache", type=click.Path(file_okay=False), metavar="DIR",
              help="Save the document's cache to DIR (atomically) after prefilling it: a new or empty "
                   "directory, or a cache lctk saved (replaced).")
@click.option("--batch", type=click.IntRange(min=0), is_flag=False, flag_value=0, default=1, show_default=True,
              metavar="[N]", help="Decode up to N questions together, as rows of one batch that reads the weights and "
                                  "the document once per step (bare --batch: all of them). Answers are the same.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: answers (question, text, "
                                                      "token_ids, ttft_s, decode_s), document_tokens, prefill_s, "
                                                      "cache, layout, timings.")
@document_options
@model_options
def ask(document, questions, questions_file, max_new_tokens, repetition_penalty, cache, save_cache, batch, as_json,
        pages, max_pages, include, exclude, max_document_bytes, follow_symlinks, **opts):
    """Answer questions about a document, prefilling it once.

    The document (any format `summarize` reads) is prefilled once over every rank, or loaded
    from --cache (saved on any layout: other degrees and world sizes read it too); each
    question is then answered after it in the time of a short prompt. Answers stream to
    stdout (with --batch, each is printed when its batch is done), progress to stderr.
    """
    from ..sessions.store import check_target

    asked = read_questions(questions, questions_file)
    for target in (cache, save_cache):  # either may be replaced later: one lctk cannot prove it wrote is
        if target:                      # refused now, before the document or the model is read, untouched
            check_target(target)
    check_preset(opts)
    doc = read_input(document, opts["timeout_s"], pages, max_pages, include, exclude, max_document_bytes,
                     follow_symlinks)
    with command_output(opts["debug"]) as out:
        lcm = open_model(opts, document_context(opts, len(doc.text), None) + max_new_tokens)
        if lcm.tokenizer is None:
            raise ValueError("lctk ask needs a tokenizer: load a model folder that has one")
        main = lcm.topo.is_main
        progress = ProgressBar(main)
        session, status = open_session(lcm, doc.text, cache, progress)
        progress.close()
        keep = save_cache or (cache if not status["loaded"] else None)
        if keep:
            session.save(keep)
        if main:
            how = f"loaded from {cache} in {session.load_s:.1f} s" if status["loaded"] else \
                f"prefilled in {session.prefill_s:.1f} s"
            click.echo(f"lctk: {doc.description}: {session.tokens} tokens, {how}"
                       f"{f'; cache saved to {keep}' if keep else ''}", err=True)
        if batch == 1 or len(asked) == 1:
            results = [answer_streaming(session, question, max_new_tokens, repetition_penalty, out if main else None,
                                        as_json, len(asked) > 1) for question in asked]
        else:
            results = session.ask_many(asked, max_new_tokens, batch=batch or None,
                                       repetition_penalty=repetition_penalty)
            if main and not as_json:  # rows finish together: each answer printed whole, in order
                for question, result in zip(asked, results):
                    out.write(f"> {question}\n{result.text.strip()}\n\n")
                    out.flush()
                    note = cut_note(result.finish_reason, max_new_tokens)
                    if note:
                        click.echo(note, err=True)
        answers = [{"question": question, "text": result.text, "token_ids": result.token_ids,
                    "finish_reason": result.finish_reason,
                    "ttft_s": result.timings["ttft_s"], "decode_s": result.timings["decode_s"],
                    "speculation": result.timings.get("speculation", {})}
                   for question, result in zip(asked, results)]
        report = run_report(lcm)
        if main and as_json:
            payload = {"answers": answers, "document_tokens": session.tokens, "prefill_s": session.prefill_s,
                       "cache_load_s": session.load_s,
                       "cache": dict(status, saved=keep), "model": opts["model"], **report}
            out.write(json.dumps(payload, ensure_ascii=False) + "\n")
