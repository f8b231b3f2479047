"""Our Ulysses attention layer against DeepSpeed's DistributedAttention, world 2.

    python benchmarks/ulysses_vs_deepspeed.py [--quick] [--threads N] [--out DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.bench.suite import script_main  # noqa: E402

if __name__ == "__main__":
    script_main(["deepspeed"], __doc__.splitlines()[0])
