"""Causal attention work per ring rank: zigzag vs contiguous layout.

    python benchmarks/causal_balance.py [--quick] [--threads N] [--out DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.bench.suite import script_main  # noqa: E402

if __name__ == "__main__":
    script_main(["imbalance"], __doc__.splitlines()[0])
