#!/usr/bin/env python
"""Print the demo document: a station logbook the project writes itself (toolkit.summarize.synthetic),
about 3,500 tokens of markdown; or write it as a PDF (one day's entry after another, headings
in bold) with --pdf. `make demo` summarises the PDF with 2 ranks.

    python examples/make_demo_document.py > demo.md
    python examples/make_demo_document.py --pdf demo.pdf        # needs fpdf2 (installed by make)
    python examples/make_demo_document.py --days 160 > long.md   # > 8192 tokens: map-reduce
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from toolkit.summarize.synthetic import station_logbook  # noqa: E402


def write_pdf(text: str, path: str) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_auto_page_break(True, margin=15)
    pdf.add_page()
    for line in text.splitlines():
        heading = line.startswith("#")
        pdf.set_font("Helvetica", style="B" if heading else "", size=14 if line.startswith("# ") else 11)
        pdf.multi_cell(0, 6, line.lstrip("# ") or " ", new_x="LMARGIN", new_y="NEXT")
    pdf.output(path)


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--days", type=int, default=60, help="one entry per day; ~57 tokens each (default: 60)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--pdf", metavar="FILE", help="write the logbook as a PDF to FILE instead of printing it")
args = parser.parse_args()
document = station_logbook(days=args.days, seed=args.seed)
if args.pdf:
    write_pdf(document, args.pdf)
else:
    sys.stdout.write(document + "\n")
