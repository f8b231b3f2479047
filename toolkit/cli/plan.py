"""`lctk plan`: the planner's arithmetic for a model, a cluster and a prompt length, before any weight."""
from __future__ import annotations

import json
import re
import shutil
import sys
from typing import Any, Optional

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..distributed.dims import DEGREE_NAMES
from ..options import RUN_OPTIONS, is_positive_int
from ..planner import (HardwareError, LayoutPlan, ModelDimsError, PlanError, load_hardware, load_model_dims,
                       make_spec, plan, step_token_budget)
from ..planner.elastic import trace_lengths, trace_throughput
from ..planner.presets import PresetError, merged_settings
from .flags import declared


class TokenCount(click.ParamType):
    """A token count: 8192, 32K (x1024), 1M (x1024^2) or 1e6."""

    name = "TOKENS"
    _pattern = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kKmM]?)\s*$")

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        match = self._pattern.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a token count (e.g. 8192, 32K, 1M)", param, ctx)
        scale = {"": 1, "k": 1024, "m": 1024 ** 2}[match.group(2).lower()]
        tokens = int(float(match.group(1)) * scale)
        if not is_positive_int(tokens):
            self.fail(f"{value!r} must be at least 1 token", param, ctx)
        return tokens


def _fmt_bytes(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f} B"


def make_console() -> Console:
    """A rich Console on click's stdout: the terminal's width and colours there; 120 columns,
    no colour and no escape codes in a pipe or a test runner, so the tables read the same."""
    stream = sys.stdout  # click.echo's stream, swapped by CliRunner; get_text_stream is deprecated
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    width = shutil.get_terminal_size((120, 24)).columns if terminal else 120
    return Console(file=stream, width=width, no_color=not terminal, highlight=False,
                   soft_wrap=False, force_terminal=None if terminal else False)


def text_table() -> Table:
    """A table without borders, a rule under its header, two spaces between columns."""
    return Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)


def format_table(candidates: list[LayoutPlan], chosen: Optional[LayoutPlan],
                 workload: str) -> Table:
    """Valid layouts (best first, chosen marked *), then rejected ones; long verdicts wrap."""
    if workload == "decode":
        order = lambda c: (c.cost.decode_ms_per_token, c.cost.prefill_seconds)  # noqa: E731
    else:
        order = lambda c: (c.cost.prefill_seconds, c.cost.decode_ms_per_token)  # noqa: E731
    valid = sorted((c for c in candidates if c.valid), key=order)
    rejected = [c for c in candidates if not c.valid]
    table = text_table()
    table.add_column("", no_wrap=True)
    for name in ("tp", "ulysses", "ring", "pp", "GiB/dev", "prefill s", "decode ms",
                 "comm/layer", "bubble"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("verdict", overflow="fold")
    for index, cand in enumerate(valid + rejected):
        cost = cand.cost
        if cand.valid:
            verdict = "ok" + ("; " + "; ".join(cand.warnings) if cand.warnings else "")
        else:
            verdict = "rejected: " + "; ".join(cand.reasons)
        cells = ["*" if cand is chosen else "", str(cand.tp), str(cand.ulysses), str(cand.ring),
                 str(cand.pp), f"{cost.memory_gib_per_device:.1f}", f"{cost.prefill_seconds:.3g}",
                 f"{cost.decode_ms_per_token:.3g}", _fmt_bytes(cost.comm_bytes_per_layer),
                 f"{cost.pipeline_bubble:.0%}" if cand.pp > 1 else "-", verdict]
        # Text, not str: a reason's brackets or colons are no markup or emoji to rich
        table.add_row(*(Text(cell) for cell in cells),
                      end_section=index == len(valid) - 1 and bool(rejected))
    return table


def freed_by_kv_dtype(candidates, dims, hw, gpus, context, new_tokens, gpn, ffn_dtype, fixed, options) -> list[str]:
    """Layouts valid with the asked kv dtype that the model's own dtype would not fit."""
    if options["kv_dtype"] == "auto":
        return []
    try:
        plain = plan(dims, hw, gpus, context, new_tokens, "auto", gpn, ffn_dtype=ffn_dtype, fixed=fixed,
                     **{**options, "kv_dtype": "auto"}).candidates
    except PlanError as err:
        plain = err.candidates or []
    fitted = {c.label for c in plain if c.valid}
    return [c.label for c in candidates if c.valid and c.label not in fitted]


def elastic_trace(dims, hw, chosen: Optional[LayoutPlan], median: int, longest: int, new_tokens: int,
                  options: dict) -> dict:
    """toolkit.planner.elastic's prediction for the chosen layout (its SP ranks split per request)."""
    if chosen is None or chosen.pp != 1 or chosen.ulysses * chosen.ring == 1:
        raise PlanError("--elastic-trace needs a chosen layout with ulysses x ring > 1 and pp = 1: give one with "
                        "--ulysses/--ring, or drop --elastic-trace")
    if longest < median:
        raise PlanError(f"--elastic-trace {longest} must be at least --context {median} (the trace's median)")
    dtype = hw.default_dtype if options["dtype"] == "auto" else options["dtype"]
    args = (dims, hw, chosen.tp, chosen.ulysses, chosen.ring, trace_lengths(median, longest), new_tokens,
            options["chunk_size"], dtype, options["kv_dtype"])
    got = trace_throughput(*args)
    got["loaded"] = trace_throughput(*args, loaded=True)["elastic_over_fixed"]
    got["degrees"] = {str(k): v for k, v in got["degrees"].items()}
    return got


def describe(dims) -> str:
    """Parameters, and what makes the family cost what it does: experts (active per token) and windows."""
    text = f"{dims.params / 1e9:.3g}B params"
    if dims.num_experts:
        text += (f", {dims.active_params / 1e9:.3g}B active: {dims.experts_per_token} of {dims.num_experts} "
                 "experts per token")
    if dims.sliding_layers:
        text += f"; {dims.sliding_layers} of {dims.num_layers} layers see the last {dims.sliding_window} positions"
    return text


@click.command("plan")
@click.option("--model", required=True, help="configs/models name or a folder with config.json")
@click.option("--gpus", type=click.IntRange(min=1), required=True, help="world size")
@click.option("--gpus-per-node", type=click.IntRange(min=1), default=None,
              help="GPUs per node [default: the hardware entry's]")
@click.option("--hardware", default="h100-80gb", show_default=True,
              help="configs/hardware name or a YAML path")
@click.option("--context", type=TokenCount(), required=True,
              help="prompt tokens: 8192, 32K, 1M")
@click.option("--new-tokens", type=click.IntRange(min=0), default=256, show_default=True)
@declared("preset", *RUN_OPTIONS, "ffn_dtype")
@click.option("--elastic-trace", "trace_longest", type=TokenCount(), default=None, metavar="LONGEST",
              help="Also predict a server's throughput on the chosen layout with elastic placement over every "
                   "request on all its SP ranks: 200 prompts whose median is --context and whose longest 1% reach "
                   "LONGEST (each alone on its ranks, ranks packed perfectly).")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="write memory and prefill time vs context per strategy to this PNG")
def plan_command(model: str, gpus: int, gpus_per_node: Optional[int], hardware: str, context: int, new_tokens: int,
                 preset: Optional[str], ffn_dtype: Optional[str], trace_longest: Optional[int], as_json: bool,
                 plot_path: Optional[str], **given) -> None:
    """Choose tp x ulysses x ring x pp for a model, a cluster and a prompt length.

    The run flags and --preset are those of the model commands: the preset's settings under
    the flags given, as a run merges them."""
    try:
        dims = load_model_dims(model)
        hw = load_hardware(hardware)
        settings = merged_settings(preset, given)
        fixed = {k: None if settings[k] == "auto" else settings[k] for k in DEGREE_NAMES}
        workload = settings["workload"]
        options = {k: settings[k] for k in ("chunk_size", "dtype", "ring_mode", "sequence_layout", "kv_dtype")}
        gpn = gpus_per_node or hw.gpus_per_node
        error: Optional[PlanError] = None
        try:
            result = plan(dims, hw, gpus, context, new_tokens, workload, gpn,
                          ffn_dtype=ffn_dtype, fixed=fixed, **options)
            candidates, chosen = result.candidates, result.chosen
        except PlanError as err:
            if not err.candidates:
                raise
            error, candidates, chosen, result = err, err.candidates, None, None
        freed = freed_by_kv_dtype(candidates, dims, hw, gpus, context, new_tokens, gpn, ffn_dtype, fixed, options)
        step_tokens = step_token_budget(hw, hw.default_dtype if options["dtype"] == "auto" else options["dtype"])
        trace = elastic_trace(dims, hw, chosen, context, trace_longest, new_tokens, options) if trace_longest else None
    except (ModelDimsError, HardwareError, PresetError, PlanError) as err:
        raise click.ClickException(str(err)) from None

    if as_json:
        payload = result.to_dict() if result else {
            "chosen": None, "candidates": [c.to_dict() for c in candidates],
            "workload": workload, "warnings": []}
        payload.update(model=dims.to_dict(), hardware=hw.name, gpus=gpus,
                       gpus_per_node=gpn, context=context, new_tokens=new_tokens, kv_dtype=options["kv_dtype"],
                       freed_by_kv_dtype=freed, serve_max_batch_tokens=step_tokens, elastic_trace=trace)
        if error:
            payload["error"] = str(error)
        click.echo(json.dumps(payload, indent=2))
    else:
        kv_note = f", KV cache {options['kv_dtype']}" if options["kv_dtype"] != "auto" else ""
        click.echo(f"{dims.name} ({describe(dims)}) on {gpus} x {hw.name} "
                   f"({min(gpn, gpus)} per node), {context:,} prompt tokens + {new_tokens} "
                   f"new, workload {workload}{kv_note}")
        make_console().print(format_table(candidates, chosen, workload if workload != "auto" else (
            "prefill" if context > 32 * 1024 else "decode")))
        if freed:
            click.echo(f"with the KV cache as {options['kv_dtype']}, {len(freed)} layout(s) fit that do not with "
                       f"the model's dtype: {', '.join(freed)}")
        if result:
            click.echo(f"chosen: {result.why}")
            for warning in result.warnings:
                click.echo(f"warning: {warning}")
        click.echo(f"lctk serve: --max-batch-tokens {step_tokens} (a step of prefill beside decoding requests takes "
                   "about 4 of their decode steps on this hardware)")
        if trace:
            click.echo(f"elastic placement, {trace['requests']} prompts (median {trace['median_tokens']:,}, longest "
                       f"{trace['longest_tokens']:,} tokens): {trace['elastic_over_fixed']:.2f}x the requests/s of every "
                       f"request on all SP ranks (degrees {trace['degrees']}) as each arrives alone; "
                       f"{trace['loaded']:.2f}x while requests wait (the degree costing the ranks least within 2x "
                       "of the fastest)")
    if plot_path:
        from ..planner.plot import plot_strategies
        spec = make_spec(hw, context, new_tokens, options["chunk_size"], options["dtype"],
                         ffn_dtype, options["ring_mode"], options["sequence_layout"], options["kv_dtype"])
        plot_strategies(dims, hw, gpus, gpn, spec, plot_path)
        if not as_json:
            click.echo(f"plot written to {plot_path}")
    if error:
        raise click.ClickException(str(error))
