"""Rerun the benchmarks and rewrite the measured block of benchmarks/RESULTS.md: the full
`lctk bench` suite, the pipeline bubble, the million-token run, the figures, and the GPU
check's table when out/gpu_check.json exists. The hand-written text of RESULTS.md around
the block is kept as it is.

    python benchmarks/run_all.py                 # everything (about an hour on 2 CPU cores)
    python benchmarks/run_all.py --skip-million  # reuse out/million_tokens.json
    python benchmarks/run_all.py --render        # only rewrite RESULTS.md from out/*.json
    python benchmarks/run_all.py --only needle   # rerun one benchmark into out/bench.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import results  # noqa: E402
from benchmarks.suite import BENCHES, merge_rerun, print_table, run_suite, write_outputs  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick suite instead of the full one")
    ap.add_argument("--skip-million", action="store_true", help="reuse out/million_tokens.json")
    ap.add_argument("--render", action="store_true", help="only rewrite RESULTS.md and the figures")
    ap.add_argument("--only", action="append", choices=BENCHES, metavar="NAME",
                    help=f"rerun only this benchmark (repeatable) and fold it into the last run: {', '.join(BENCHES)}")
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="the markdown whose measured block is rewritten")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.render:
        last = out / ("bench-quick.json" if args.quick else "bench.json")
        result = run_suite(quick=args.quick, only=args.only)
        if args.only and last.is_file():
            result = merge_rerun(json.loads(last.read_text(encoding="utf-8")), result, args.only)
        write_outputs(result, out)
        print_table(result["metrics"], sys.stdout)
        sys.stdout.flush()
        if not args.only:
            subprocess.run([sys.executable, str(HERE / "pipeline_bubble.py"), "--out", str(out)], check=True)
            if not args.skip_million:
                subprocess.run([sys.executable, str(HERE / "million_tokens.py"), "--out", str(out)], check=True)
    elif not (out / "bench.json").is_file() and not (out / "bench-quick.json").is_file():
        sys.exit(f"run_all: nothing to render, {out} has no bench.json (run `python benchmarks/run_all.py` first)")
    figures = HERE / "figures"
    figures.mkdir(exist_ok=True)
    for source, target in (("bench.png", "bench_summary.png"), ("bench-quick.png", "bench_summary.png"),
                           ("million_tokens.png", "million_tokens.png")):
        if (out / source).is_file() and (source != "bench-quick.png" or not (out / "bench.png").is_file()):
            shutil.copyfile(out / source, figures / target)
    print("wrote", results.write(out, args.results))


if __name__ == "__main__":
    main()
