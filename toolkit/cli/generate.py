"""`lctk generate`: continue a prompt (or answer it with --chat), streaming tokens."""
from __future__ import annotations

import json

import click

from .progress import ProgressBar, TokenPrinter
from .inputs import read_input
from .flags import declared
from .support import check_preset, command_output, model_options, open_model, run_report


@click.command()
@click.option("--prompt", metavar="TEXT", help="The prompt.")
@click.option("--prompt-file", metavar="FILE|-", help="Read the prompt from a document: text of any name, PDF, HTML, "
                                                       "DOCX, EPUB or a folder (`-`: stdin).")
@declared("max_document_bytes", "follow_symlinks")
@click.option("--chat/--raw", default=False, show_default=True,
              help="--chat wraps the prompt in the model's chat template; --raw tokenises it as is, "
                   "like tokenizer(prompt).")
@declared("max_new_tokens", max_new_tokens=64)
@click.option("--greedy", is_flag=True, help="Greedy decoding: the default unless a sampling option is given.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), metavar="T",
              help="Sample with this temperature.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), metavar="P", help="Sample from the top-p mass.")
@click.option("--top-k", type=click.IntRange(min=1), metavar="K", help="Sample from the k likeliest tokens.")
@declared("repetition_penalty", repetition_penalty=1.0)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (same tokens on every rank).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, token_ids, prompt_tokens, "
                                                      "layout, timings.")
@model_options
def generate(prompt, prompt_file, max_document_bytes, follow_symlinks, chat, max_new_tokens, greedy, temperature,
             top_p, top_k, repetition_penalty, seed, as_json, **opts):
    """Continue a prompt (or answer it with --chat); tokens stream to stdout as they come."""
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give exactly one of --prompt TEXT and --prompt-file FILE")
    sampling = temperature is not None or top_p is not None or top_k is not None
    if greedy and sampling:
        raise click.UsageError("--greedy cannot be combined with --temperature, --top-p or --top-k")
    check_preset(opts)
    if prompt_file is not None:
        prompt = read_input(prompt_file, opts["timeout_s"], max_document_bytes=max_document_bytes,
                            follow_symlinks=follow_symlinks).text
    if not prompt:
        raise click.UsageError("the prompt is empty")
    with command_output(opts["debug"]) as out:
        lcm = open_model(opts, len(prompt) // 4 + max_new_tokens)  # ~4 characters a token
        ids = lcm.encode(prompt, chat=chat)
        context = getattr(lcm.config, "max_position_embeddings", None)
        if context and ids.shape[1] + max_new_tokens > context:
            raise ValueError(f"the prompt is {ids.shape[1]} tokens; with {max_new_tokens} new tokens it exceeds the "
                             f"model's context of {context} positions (for documents use `lctk summarize`)")
        main = lcm.topo.is_main
        progress = ProgressBar(main)
        printer = TokenPrinter(lcm.tokenizer, out) if main and not as_json else None
        result = lcm.generate(ids, max_new_tokens, do_sample=sampling, temperature=temperature or 1.0,
                              top_k=top_k or 0, top_p=top_p or 1.0, repetition_penalty=repetition_penalty,
                              seed=seed, on_token=printer, on_chunk=progress.chunk)
        progress.close()
        report = run_report(lcm)
        if not main:
            return
        if as_json:
            payload = {"text": result.text, "token_ids": result.token_ids, "prompt_tokens": result.prompt_tokens,
                       "finish_reason": result.finish_reason, "timings": result.timings, **report}
            out.write(json.dumps(payload, ensure_ascii=False) + "\n")
        else:
            printer.finish(result.text, result.finish_reason, max_new_tokens)
