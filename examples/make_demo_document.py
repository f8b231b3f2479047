#!/usr/bin/env python
"""Print the demo document: a station logbook the project writes itself (toolkit.summarize.synthetic),
about 3,500 tokens of markdown. `make demo` summarises it with 2 ranks.

    python examples/make_demo_document.py > demo.md
    python examples/make_demo_document.py --days 160 > long.md   # > 8192 tokens: map-reduce
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from toolkit.summarize.synthetic import station_logbook  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--days", type=int, default=60, help="one entry per day; ~57 tokens each (default: 60)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
sys.stdout.write(station_logbook(days=args.days, seed=args.seed) + "\n")
