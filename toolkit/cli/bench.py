"""`lctk bench`: a thin command over the benchmark suite, whose measuring code lives in the
repository's benchmarks/ folder (not in the installed package: it imports nothing of it)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .support import command_output


def benchmark_suite():
    """benchmarks.suite of the checkout this package runs from; one sentence when there is none."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "suite.py").is_file():
        raise click.ClickException("lctk bench runs from a checkout of the repository (benchmarks/ is not installed "
                                   "with the package): clone it and run `make bench`")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import suite

    return suite


@click.command()
@click.option("--quick", is_flag=True, help="Small sizes: the whole suite in about 12 minutes on 2 CPU cores.")
@click.option("--json", "as_json", is_flag=True, help='Print one JSON object {"metrics": ..., "runs": ...} to stdout.')
@click.option("--out", "out_dir", default="benchmarks/out", show_default=True, metavar="DIR",
              type=click.Path(file_okay=False), help="Where the JSON and the plot are written.")
@click.option("--only", multiple=True, metavar="NAME",
              help="Run only this benchmark (repeatable): prefill_speed, prefill_memory, sp2, deepspeed, imbalance, "
                   "chunked_memory, needle, loading, sessions, serve, decode, swa, kv_dtypes.")
@click.option("--threads", type=click.IntRange(min=1), metavar="N",
              help="Cores to use: world 1 runs N threads, each of the 2 ranks N/2. [default: all]")
def bench_command(quick, as_json, out_dir, only, threads):
    """Measure prefill speed and memory against transformers, SP efficiency, communication
    against theory, causal balance, chunked memory, needle-in-a-haystack, our Ulysses
    against DeepSpeed's, loading, document sessions, the server and decode (against
    transformers and the memory bound, tp/ring at 2 ranks, batched questions). Every timed
    figure is a ratio to a baseline run alongside it; sliding-window attention's work against its
    closed form; a quantised KV cache's accuracy (needle, KL) and bytes per kv dtype.

    Progress goes to stderr; the table (or, with --json, the JSON object) to stdout.
    """
    suite = benchmark_suite()
    unknown = sorted(set(only) - set(suite.BENCHES))
    if unknown:
        raise click.BadParameter(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(suite.BENCHES)}",
                                 param_hint="--only")
    with command_output(debug=False) as out:  # first-run notices (DeepSpeed's, conversions) go to stderr
        result = suite.run_suite(quick=quick, only=list(only) or None, threads=threads)
        paths = suite.write_outputs(result, out_dir)
        if as_json:
            out.write(json.dumps({k: result[k] for k in ("metrics", "runs", "verdicts", "errors", "mode", "machine",
                                                         "seconds")}, default=str) + "\n")
        else:
            suite.print_table(result["metrics"], out)
            out.write(f"\n{result['mode']} run, {result['seconds']:.0f} s; written: {', '.join(paths.values())}\n")
    for name, error in result["errors"].items():
        click.echo(f"{name} failed: {error}", err=True)
    if result["errors"]:
        raise SystemExit(1)
