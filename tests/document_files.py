"""Real documents the tests write themselves with the libraries people make them with: fpdf2
for PDF, python-docx for DOCX, ebooklib for EPUB, plain strings for HTML and text."""
from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "The harbour authority approved the new breakwater in March.",
    "Construction began on the northern pier after the storms.",
    "Engineer Ada Okafor reported the tide gauge readings to the council.",
    "The final cost came to 4.2 million, under the budget of 5 million.",
    "The council thanked the divers who surveyed the seabed.",
    "Ferries resumed their winter timetable in November.",
]


def pdf(path: Path, pages: list[str]) -> Path:
    from fpdf import FPDF

    doc = FPDF()
    doc.set_font("Helvetica", size=12)
    for text in pages:
        doc.add_page()
        doc.multi_cell(0, 6, text)
    doc.output(str(path))
    return path


def scanned_pdf(path: Path) -> Path:
    """Pages with drawings and no text layer, as a scanner makes them."""
    from fpdf import FPDF

    doc = FPDF()
    for _ in range(2):
        doc.add_page()
        doc.rect(20, 20, 100, 60, style="F")
    doc.output(str(path))
    return path


def encrypted_pdf(path: Path, source: Path, password: str = "secret") -> Path:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(source))
    writer.encrypt(user_password=password, owner_password=password + "-owner", algorithm="RC4-128")
    with open(path, "wb") as handle:
        writer.write(handle)
    return path


def docx(path: Path, title: str, sections: list[tuple[str, list[str]]], table=None) -> Path:
    import docx as python_docx

    doc = python_docx.Document()
    doc.add_heading(title, 0)
    for heading, paragraphs in sections:
        doc.add_heading(heading, 1)
        for text in paragraphs:
            doc.add_paragraph(text)
    if table:
        grid = doc.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, value in enumerate(row):
                grid.cell(r, c).text = value
    doc.save(str(path))
    return path


def epub(path: Path, title: str, chapters: list[tuple[str, list[str]]]) -> Path:
    from ebooklib import epub as ebook

    book = ebook.EpubBook()
    book.set_identifier("lctk-test-book")
    book.set_title(title)
    book.set_language("en")
    items = []
    for i, (name, paragraphs) in enumerate(chapters, 1):
        body = "".join(f"<p>{p}</p>" for p in paragraphs)
        item = ebook.EpubHtml(title=name, file_name=f"chapter{i}.xhtml", lang="en",
                              content=f"<html><body><h1>{name}</h1>{body}</body></html>")
        book.add_item(item)
        items.append(item)
    book.toc = items
    book.add_item(ebook.EpubNcx())
    book.add_item(ebook.EpubNav())
    book.spine = ["nav", *items]
    ebook.write_epub(str(path), book)
    return path


def html_page(title: str, heading: str, paragraphs: list[str]) -> str:
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return (f"<!DOCTYPE html><html><head><title>{title}</title><style>p {{color: red}}</style>"
            f"<script>var menu = 'do not read me';</script></head><body>"
            f"<nav><a href='/'>Home</a> <a href='/about'>About us</a></nav>"
            f"<main><h1>{heading}</h1>{body}<h2>Table</h2><table><tr><th>Year</th><th>Ships</th></tr>"
            f"<tr><td>2024</td><td>31</td></tr></table></main>"
            f"<footer>Copyright footer text</footer></body></html>")
