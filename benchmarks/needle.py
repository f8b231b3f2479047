"""Needle in a haystack with SmolLM2-135M: transformers in one process vs ring=2 on 2 ranks.

    python benchmarks/needle.py [--quick] [--threads N] [--out DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.bench.suite import script_main  # noqa: E402

if __name__ == "__main__":
    script_main(["needle"], __doc__.splitlines()[0])
