"""`lctk`: summarise long documents and generate text with a Hugging Face causal LM, its
prompt split over every rank the launcher started (deepspeed, torchrun, accelerate or none).

Every rank runs the same command; rank 0 alone prints. Cheap checks (files, flags, preset,
model config, layout) run before any weight is loaded.
"""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata

import click

from . import __version__
from .cli_bench import bench_command
from .cli_plan import plan_command, presets_command
from .cli_support import (LctkGroup, ProgressBar, TokenPrinter, check_output_path, command_output, is_main,
                          read_input, share_cpu_cores, write_atomic)
from .summarize import SUPPORTED_SUFFIXES

# toolkit.models.DEMO_ALIAS and DTYPES, repeated so that `--help` needs no torch (a test keeps them equal)
DEMO_ALIAS = "smollm2-135m"
DTYPES = ("float32", "bfloat16", "float16")

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=LctkGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="lctk")
@click.option("--debug", is_flag=True, help="Show full tracebacks and library logs on errors.")
def cli(debug):
    """Exact long-context inference: summarise or continue a prompt too long for one device.

    \b
    lctk summarize report.md                      # one process, the demo model
    deepspeed --num_gpus 8 launch/run.py summarize report.md --model PATH
    torchrun --nproc_per_node 4 launch/run.py generate --prompt-file p.txt --json
    """


def model_options(command):
    """Options shared by the commands that load a model."""
    options = [
        click.option("--model", "-m", default=DEMO_ALIAS, show_default=True, metavar="NAME|PATH",
                     help="A folder saved by save_pretrained, a .gguf file, a hub id (cached), or the demo "
                          f"alias {DEMO_ALIAS} (tiny: real summaries want a real long-context model)."),
        click.option("--gguf-file", metavar="FILE", help="GGUF file inside the --model folder (needs `gguf`)."),
        click.option("--preset", metavar="NAME|PATH", help="Layout preset (see `lctk presets`); the degree, "
                                                            "--chunk-size and --dtype flags override it. "
                                                            "[default: auto, the planner's choice, unless "
                                                            "degrees are given]"),
        click.option("--tp", type=click.IntRange(min=1), help="Tensor-parallel degree (DeepSpeed AutoTP; keep "
                                                              "it within a node; must divide the heads)."),
        click.option("--ulysses", type=click.IntRange(min=1), help="Ulysses sequence-parallel degree "
                                                                   "(all-to-all over heads)."),
        click.option("--ring", type=click.IntRange(min=1), help="Ring-attention degree (any head count; "
                                                                "may span nodes)."),
        click.option("--pp", type=click.IntRange(min=1), help="Pipeline degree (layer stages): for weights "
                                                              "that fit no other way."),
        click.option("--chunk-size", type=click.IntRange(min=1), metavar="TOKENS",
                     help="Prefill chunk length; bounds activation memory. [default: the preset's]"),
        click.option("--dtype", type=click.Choice(DTYPES), help="Compute dtype. [default: the preset's: float32 "
                                                                "on CPU, bfloat16 on GPUs]"),
        click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=1800.0, show_default=True,
                     metavar="SECONDS", help="How long a rank waits for the others before the job fails."),
        click.option("--trust-remote-code", is_flag=True, help="Run model code shipped with a hub repo (off: "
                                                               "only transformers' own code runs)."),
        click.option("--debug", is_flag=True, help="Show full tracebacks and library logs on errors."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_model(opts: dict, context_tokens: int):
    """The LongContextModel of the options; a bad preset, model or layout fails before weights load."""
    from .api import LongContextModel

    share_cpu_cores()
    lcm = LongContextModel.from_pretrained(
        opts["model"], preset=opts["preset"], context_tokens=context_tokens, tp=opts["tp"], ulysses=opts["ulysses"],
        ring=opts["ring"], pp=opts["pp"], gguf_file=opts["gguf_file"], chunk_size=opts["chunk_size"],
        dtype=opts["dtype"], trust_remote_code=opts["trust_remote_code"], timeout_s=opts["timeout_s"])
    if lcm.topo.is_main:
        d = lcm.layout
        dtype = str(getattr(lcm.model, "dtype", "")).replace("torch.", "")
        click.echo(f"lctk: {opts['model']} on {lcm.topo.world} rank(s): tp={d['tp']} x ulysses={d['ulysses']} x "
                   f"ring={d['ring']} x pp={d['pp']}, prefill chunks of {lcm.chunk_size} tokens, {dtype}", err=True)
    return lcm


def check_preset(opts: dict):
    """A bad preset fails in a second, before the model's config (a GGUF parse: seconds) is read."""
    if opts["preset"]:
        from .presets import load_preset

        load_preset(opts["preset"])


def _document_context(opts: dict, chars: int, max_context: int | None) -> int:
    """Tokens the planner sizes one pass for: the document (~4 characters a token), at most the
    model's context (or --max-context), since map-reduce never prefills more than that at once.
    Only a long document pays for reading the config here (a GGUF config takes seconds)."""
    tokens = min(chars // 4 + 1, max_context or chars)
    if tokens <= 32 * 1024:  # within any model's context worth planning for: no need to look
        return max(1, tokens)
    from .models import load_config, resolve_source

    config = load_config(resolve_source(opts["model"], opts["gguf_file"]), opts["trust_remote_code"])
    return max(1, min(tokens, getattr(config, "max_position_embeddings", None) or tokens))


def _layout(lcm) -> dict:
    return {k: lcm.layout[k] for k in ("tp", "ulysses", "ring", "pp")}


@cli.command()
@click.argument("file", metavar="FILE|-")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True, metavar="N",
              help="Length of the summary, and of each section's summary in map-reduce.")
@click.option("--instruction", metavar="TEXT", help="What to ask for. [default: a short paragraph on the "
                                                    "main events, people, numbers and conclusions]")
@click.option("--max-context", type=click.IntRange(min=128), metavar="TOKENS",
              help="Treat the model's context as this many tokens: smaller sections, less memory per pass. "
                   "[default: the model's max_position_embeddings]")
@click.option("--single-pass", is_flag=True, help="Fail instead of splitting a document that does not fit.")
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.15, show_default=True,
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
        lcm = load_model(opts, _document_context(opts, len(text), max_context))
        main = lcm.topo.is_main
        progress = ProgressBar(main)
        printer = TokenPrinter(lcm.tokenizer, out, strip=True) if main and not (as_json or output) else None
        result = lcm.summarize(text, max_new_tokens, instruction=instruction, on_progress=progress,
                               on_token=printer, max_context=max_context, single_pass=single_pass,
                               repetition_penalty=repetition_penalty, cache_dir=cache_dir, resume=resume)
        progress.close()
        if not main:
            return
        click.echo(f"lctk: {result.mode} summary: {result.sections} section(s), {result.levels} map level(s), "
                   f"{result.document_tokens} document tokens, {result.prompt_tokens} tokens prefilled, "
                   f"{result.timings['total_s']:.1f} s", err=True)
        payload = {"summary": result.summary, "mode": result.mode, "sections": result.sections,
                   "levels": result.levels, "document_tokens": result.document_tokens,
                   "prompt_tokens": result.prompt_tokens, "new_tokens": result.new_tokens,
                   "section_summaries": result.section_summaries, "model": opts["model"], "layout": _layout(lcm),
                   "timings": result.timings}
        if output:
            write_atomic(output, json.dumps(payload, ensure_ascii=False) + "\n" if as_json else result.summary + "\n")
            click.echo(f"lctk: summary written to {output}", err=True)
        elif as_json:
            out.write(json.dumps(payload, ensure_ascii=False) + "\n")
        else:
            printer.finish(result.summary)


@cli.command()
@click.option("--prompt", metavar="TEXT", help="The prompt.")
@click.option("--prompt-file", metavar="FILE|-", help="Read the prompt from a UTF-8 text file (`-`: stdin).")
@click.option("--chat/--raw", default=False, show_default=True,
              help="--chat wraps the prompt in the model's chat template; --raw tokenises it as is, "
                   "like tokenizer(prompt).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True, metavar="N")
@click.option("--greedy", is_flag=True, help="Greedy decoding: the default unless a sampling option is given.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), metavar="T",
              help="Sample with this temperature.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), metavar="P", help="Sample from the top-p mass.")
@click.option("--top-k", type=click.IntRange(min=1), metavar="K", help="Sample from the k likeliest tokens.")
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (same tokens on every rank).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, token_ids, prompt_tokens, "
                                                      "layout, timings.")
@model_options
def generate(prompt, prompt_file, chat, max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty,
             seed, as_json, **opts):
    """Continue a prompt (or answer it with --chat); tokens stream to stdout as they come."""
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give exactly one of --prompt TEXT and --prompt-file FILE")
    sampling = temperature is not None or top_p is not None or top_k is not None
    if greedy and sampling:
        raise click.UsageError("--greedy cannot be combined with --temperature, --top-p or --top-k")
    check_preset(opts)
    if prompt_file is not None:
        prompt = read_input(prompt_file, None, opts["timeout_s"])
    if not prompt:
        raise click.UsageError("the prompt is empty")
    with command_output(opts["debug"]) as out:
        lcm = load_model(opts, len(prompt) // 4 + max_new_tokens)  # ~4 characters a token
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
        if not main:
            return
        if as_json:
            payload = {"text": result.text, "token_ids": result.token_ids, "prompt_tokens": result.prompt_tokens,
                       "layout": _layout(lcm), "timings": result.timings}
            out.write(json.dumps(payload, ensure_ascii=False) + "\n")
        else:
            printer.finish(result.text)


def _versions() -> dict:
    found = {"python": platform.python_version(), "lctk": __version__}
    for package in ("torch", "transformers", "deepspeed", "accelerate", "click", "gguf"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _runtime() -> dict:
    import torch
    import torch.distributed as dist

    from .distributed.topology import launcher_env

    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
    elif not dist.is_available():
        backend = "none"
    else:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if torch.cuda.is_available():
        devices = [f"cuda:{i} {torch.cuda.get_device_name(i)} "
                   f"({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
                   for i in range(torch.cuda.device_count())]
    else:
        devices = [f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"]
    return {"backend": backend, "devices": devices, **launcher_env()}


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def info(as_json, debug):
    """Versions, distributed backend, devices, this rank and world, optional parts installed."""
    from .backends import optional_parts

    report = {"versions": _versions(), **_runtime(), "optional": optional_parts()}
    if not is_main():
        return
    if as_json:
        click.echo(json.dumps(report))
        return
    for name, version in report["versions"].items():
        click.echo(f"{name:<13} {version}")
    click.echo(f"{'backend':<13} {report['backend']}")
    for device in report["devices"]:
        click.echo(f"{'device':<13} {device}")
    click.echo(f"{'world':<13} {report['world']} (rank {report['rank']}, local rank {report['local_rank']}, "
               f"{report['local_world']} per node)")
    for part, present in report["optional"].items():
        click.echo(f"{'optional':<13} {part}: {'yes' if present else 'no'}")


cli.add_command(plan_command, "plan")
cli.add_command(presets_command, "presets")
cli.add_command(bench_command, "bench")


def main(argv=None):
    """Console script `lctk`; launch/run.py calls it under deepspeed and torchrun."""
    cli.main(args=argv, prog_name="lctk")


if __name__ == "__main__":
    main()
