"""What the model-loading commands share: their options, and the model they open."""
from __future__ import annotations

import click

from ..config import DEMO_ALIAS, DTYPE_NAMES
from .support import debug_option, share_cpu_cores


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
        click.option("--dtype", type=click.Choice(DTYPE_NAMES), help="Compute dtype. [default: the preset's; "
                                                                     "without one the hardware's: float32 on CPU, "
                                                                     "bfloat16 on GPUs]"),
        click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=1800.0, show_default=True,
                     metavar="SECONDS", help="How long a rank waits for the others before the job fails."),
        click.option("--trust-remote-code", is_flag=True, help="Run model code shipped with a hub repo (off: "
                                                               "only transformers' own code runs)."),
        debug_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def open_model(opts: dict, context_tokens: int):
    """The LongContextModel of the options; a bad preset, model or layout fails before weights load."""
    from ..api import LongContextModel

    share_cpu_cores()
    lcm = LongContextModel.from_pretrained(
        opts["model"], preset=opts["preset"], context_tokens=context_tokens, tp=opts["tp"], ulysses=opts["ulysses"],
        ring=opts["ring"], pp=opts["pp"], gguf_file=opts["gguf_file"], chunk_size=opts["chunk_size"],
        dtype=opts["dtype"], trust_remote_code=opts["trust_remote_code"], timeout_s=opts["timeout_s"])
    if lcm.topo.is_main:
        d = lcm.layout
        click.echo(f"lctk: {opts['model']} on {lcm.topo.world} rank(s): tp={d['tp']} x ulysses={d['ulysses']} x "
                   f"ring={d['ring']} x pp={d['pp']}, prefill chunks of {lcm.chunk_size} tokens, {lcm.run.dtype}",
                   err=True)
    return lcm


def check_preset(opts: dict):
    """A bad preset fails in a second, before the model's config (a GGUF parse: seconds) is read."""
    if opts["preset"]:
        from ..planner.presets import load_preset

        load_preset(opts["preset"])


def document_context(opts: dict, chars: int, max_context: int | None) -> int:
    """Tokens the planner sizes one pass for: the document (~4 characters a token), at most the
    model's context (or --max-context), since map-reduce never prefills more than that at once.
    Only a long document pays for reading the config here (a GGUF config takes seconds)."""
    tokens = min(chars // 4 + 1, max_context or chars)
    if tokens <= 32 * 1024:  # within any model's context worth planning for: no need to look
        return max(1, tokens)
    from ..models import load_config, resolve_source

    config = load_config(resolve_source(opts["model"], opts["gguf_file"]), opts["trust_remote_code"])
    return max(1, min(tokens, getattr(config, "max_position_embeddings", None) or tokens))
