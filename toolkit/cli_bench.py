"""`lctk bench`: the benchmark suite (toolkit.bench) from the command line."""
from __future__ import annotations

import json

import click

from .bench.suite import BENCHES


@click.command()
@click.option("--quick", is_flag=True, help="Small sizes: the whole suite in under 10 minutes on 2 CPU cores.")
@click.option("--json", "as_json", is_flag=True, help='Print one JSON object {"metrics": ..., "runs": ...} to stdout.')
@click.option("--out", "out_dir", default="benchmarks/out", show_default=True, metavar="DIR",
              type=click.Path(file_okay=False), help="Where the JSON and the plot are written.")
@click.option("--only", multiple=True, type=click.Choice(BENCHES), metavar="NAME",
              help=f"Run only this benchmark (repeatable): {', '.join(BENCHES)}.")
@click.option("--threads", type=click.IntRange(min=1), metavar="N",
              help="Cores to use: world 1 runs N threads, each of the 2 ranks N/2. [default: all]")
def bench_command(quick, as_json, out_dir, only, threads):
    """Measure prefill speed and memory against transformers, SP efficiency, communication
    against theory, causal balance, chunked memory, needle-in-a-haystack and our Ulysses
    against DeepSpeed's. Every timed figure is a ratio to a baseline run alongside it.

    Progress goes to stderr; the table (or, with --json, the JSON object) to stdout.
    """
    from .bench import report
    from .bench.suite import run_suite, write_outputs

    result = run_suite(quick=quick, only=list(only) or None, threads=threads)
    paths = write_outputs(result, out_dir)
    if as_json:
        click.echo(json.dumps({k: result[k] for k in ("metrics", "runs", "verdicts", "errors", "mode", "machine",
                                                      "seconds")}, default=str))
    else:
        click.echo(report.text_table(result["metrics"]))
        click.echo(f"\n{result['mode']} run, {result['seconds']:.0f} s; written: {', '.join(paths.values())}")
        for name, error in result["errors"].items():
            click.echo(f"{name} failed: {error}", err=True)
    if result["errors"]:
        raise SystemExit(1)
