"""World-1 prefill against plain transformers (sdpa, logits_to_keep=1): tokens/s, MFU, peak memory.

    python benchmarks/prefill_vs_hf.py [--quick] [--threads N] [--out DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.bench.suite import script_main  # noqa: E402

if __name__ == "__main__":
    script_main(["prefill_speed", "prefill_memory"], __doc__.splitlines()[0])
