"""Activation memory of chunked prefill at 8K..64K tokens (must not grow with N).

    python benchmarks/chunked_memory.py [--quick] [--threads N] [--out DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.bench.suite import script_main  # noqa: E402

if __name__ == "__main__":
    script_main(["chunked_memory"], __doc__.splitlines()[0])
