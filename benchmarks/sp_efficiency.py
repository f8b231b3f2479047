"""Ulysses=2 and ring=2 against one process on the same cores; comm bytes against the closed forms.

    python benchmarks/sp_efficiency.py [--quick] [--threads N] [--out DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.bench.suite import script_main  # noqa: E402

if __name__ == "__main__":
    script_main(["sp2"], __doc__.splitlines()[0])
