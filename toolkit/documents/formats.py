"""One reader per format, each bytes -> text with the structure kept as markdown headings
and page markers. Their libraries are imported when a document needs them. HTML is read in
webpage.py; a DOCX or EPUB comes here once sniff.py has held its archive to the limits."""
from __future__ import annotations

import io
import re
import warnings

from .base import PAGE_MARK, DocumentError
from .limits import MAX_DOCUMENT_BYTES, over_limit, size_text
from .webpage import html_text, squash as _squash

# ---- PDF (pypdf) ---------------------------------------------------------------------------
_RANGE = re.compile(r"^\s*(\d*)\s*(-?)\s*(\d*)\s*$")


def parse_pages(spec: str) -> list[tuple[int, int | None]]:
    """'3-17', '5', '1-3,9,12-' -> 1-based inclusive ranges (None: to the end); checked before any reading."""
    ranges = []
    for part in spec.split(","):
        found = _RANGE.match(part)
        if not found or not (found[1] or found[3]) or (not found[2] and not found[1]):
            raise DocumentError(f"--pages {spec!r}: give page numbers and ranges such as 3-17, 5 or 1-3,9,12-")
        first = int(found[1]) if found[1] else 1
        last = (int(found[3]) if found[3] else None) if found[2] else first
        if first < 1 or (last is not None and last < first):
            raise DocumentError(f"--pages {spec!r}: pages count from 1 and ranges go upwards, e.g. 3-17")
        ranges.append((first, last))
    return ranges


def select_pages(count: int, where: str, pages: str | None, max_pages: int | None) -> list[int]:
    """The 1-based page numbers to read, in order, each once."""
    chosen = list(range(1, count + 1))
    if pages:
        ranges = parse_pages(pages)
        beyond = [first for first, _ in ranges if first > count]
        if beyond:
            raise DocumentError(f"{where} has {count} pages; --pages {pages} starts at page {beyond[0]}")
        wanted = {p for first, last in ranges for p in range(first, min(last or count, count) + 1)}
        chosen = [p for p in chosen if p in wanted]
    return chosen[:max_pages] if max_pages else chosen


def pdf_text(data: bytes, where: str, pages: str | None = None, max_pages: int | None = None,
             limit: int = MAX_DOCUMENT_BYTES) -> tuple[str, tuple]:
    """Text page by page, each page introduced by its marker; scanned or locked PDFs refused. pypdf
    bounds each stream it inflates; the text as a whole is held to `limit` characters."""
    import logging

    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings on odd but readable files are noise here
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentError(f"{where} is an encrypted PDF that needs a password; decrypt it first, "
                                "e.g. `qpdf --decrypt --password=PASSWORD in.pdf out.pdf`")
        numbers = select_pages(len(reader.pages), where, pages, max_pages)
        texts, total = [], 0
        for n in numbers:
            texts.append((n, (reader.pages[n - 1].extract_text() or "").strip()))
            total += len(texts[-1][1])
            if total > limit:
                raise over_limit(where, f"holds more than {size_text(limit)} of text (by page {n})", limit)
    except DocumentError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, OSError) as err:
        raise DocumentError(f"{where} is not a readable PDF ({type(err).__name__}: {err}); "
                            "save it again, or print it to a new PDF") from None
    kept = [(n, t) for n, t in texts if t]
    if not kept:
        raise DocumentError(f"{where} has no text layer (a scan, or pages of images); run OCR on it first, "
                            "e.g. `ocrmypdf in.pdf out.pdf`")
    return "\n\n".join(f"{PAGE_MARK.format(n)}\n{t}" for n, t in kept), tuple(n for n, _ in kept)


# ---- DOCX (python-docx) --------------------------------------------------------------------
_DOCX_HEADING = re.compile(r"^heading (\d)$", re.I)


def docx_text(data: bytes, where: str) -> str:
    """Paragraphs and tables in document order; Heading n styles become markdown headings."""
    import docx
    from docx.table import Table

    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as err:  # python-docx raises a mix of zip, XML and key errors on damaged files
        raise DocumentError(f"{where} is not a readable DOCX file ({type(err).__name__}); "
                            "save it again from the program that made it") from None
    blocks = []
    for item in document.iter_inner_content():
        if isinstance(item, Table):
            rows = [" | ".join(_squash(cell.text) for cell in row.cells) for row in item.rows]
            if any(r.strip(" |") for r in rows):
                blocks.append("\n".join(r for r in rows if r.strip(" |")))
            continue
        text = item.text.strip()
        if not text:
            continue
        style = (item.style.name if item.style is not None else "") or ""
        level = _DOCX_HEADING.match(style)
        if style.lower() == "title":
            blocks.append(f"# {text}")
        elif level:
            blocks.append(f"{'#' * min(6, int(level[1]))} {text}")
        elif style.lower().startswith("list"):
            blocks.append(f"- {text}")
        else:
            blocks.append(text)
    if not blocks:
        raise DocumentError(f"{where} is a DOCX file with no text in it")
    return "\n\n".join(blocks)


# ---- EPUB (ebooklib) -----------------------------------------------------------------------
def _toc_titles(entries, titles: dict) -> None:
    """href -> title over the table of contents, in order, with a stack of its own (no recursion)."""
    stack = list(reversed(entries))
    while stack:
        entry = stack.pop()
        if isinstance(entry, tuple):  # (section, children)
            stack.extend(reversed([entry[0], *entry[1]]))
        elif getattr(entry, "href", None):
            titles.setdefault(entry.href.split("#")[0], entry.title)


def epub_text(data: bytes, where: str) -> str:
    """Chapters in reading order (the spine), each starting with a heading."""
    import ebooklib
    from ebooklib import epub

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            book = epub.read_epub(io.BytesIO(data), {"ignore_ncx": True})
    except Exception as err:  # ebooklib raises zip, XML and its own errors on damaged books
        raise DocumentError(f"{where} is not a readable EPUB book ({type(err).__name__}); "
                            "save it again, or convert it with `ebook-convert`") from None
    titles: dict = {}
    _toc_titles(book.toc, titles)
    chapters = []
    for idref, *_ in book.spine:
        item = book.get_item_with_id(idref)
        if item is None or item.get_type() != ebooklib.ITEM_DOCUMENT or isinstance(item, epub.EpubNav):
            continue
        try:
            text = html_text(item.get_content().decode("utf-8", "replace"), where, title_heading=False)
        except DocumentError:
            continue  # a cover or a blank page
        if not text.startswith("#"):
            text = f"# {titles.get(item.get_name()) or f'Chapter {len(chapters) + 1}'}\n\n{text}"
        chapters.append(text)
    if not chapters:
        raise DocumentError(f"{where} is an EPUB book with no text in its chapters")
    return "\n\n".join(chapters)
