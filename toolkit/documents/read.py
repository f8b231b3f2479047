"""The one way a command reads a document: a file of any supported kind (chosen by content),
a folder, or stdin bytes; every refusal is one sentence, raised before any model loads.
Limits (limits.py) are checked before the work they bound: a file's size from stat before it
is read, a ZIP's expanded size from its records before a member is inflated."""
from __future__ import annotations

from pathlib import Path

from . import formats
from .base import Document, DocumentError
from .folder import folder_text
from .limits import MAX_DOCUMENT_BYTES, read_file, read_stream
from .sniff import detect

FORMATS = ("text (any name: UTF-8, UTF-16 with BOM)", "PDF", "HTML", "DOCX", "EPUB", "a folder")


def document_from_bytes(data: bytes, where: str, suffix: str = "", pages: str | None = None,
                        max_pages: int | None = None, max_document_bytes: int = MAX_DOCUMENT_BYTES) -> Document:
    """Read bytes as whichever format their content is; --pages/--max-pages only apply to a PDF.
    `max_document_bytes` bounds what a ZIP-based format expands to and a PDF's text."""
    kind, text = detect(data, where, suffix, max_document_bytes)
    if kind != "pdf" and (pages or max_pages):
        raise DocumentError(f"--pages and --max-pages apply to PDF documents; {where} is {kind}")
    if kind == "pdf":
        text, numbers = formats.pdf_text(data, where, pages, max_pages, max_document_bytes)
        return Document(text, kind, where, pages=numbers)
    if kind == "html":
        text = formats.html_text(text, where)
    elif kind == "docx":
        text = formats.docx_text(data, where)
    elif kind == "epub":
        text = formats.epub_text(data, where)
    return Document(text, kind, where)


def read_stdin(stream, pages: str | None = None, max_pages: int | None = None,
               max_document_bytes: int = MAX_DOCUMENT_BYTES) -> Document:
    """Standard input's bytes, read no further than the limit."""
    data = read_stream(stream, "standard input", max_document_bytes)
    return document_from_bytes(data, "standard input", "", pages, max_pages, max_document_bytes)


def read_document(path, *, pages: str | None = None, max_pages: int | None = None, include=(), exclude=(),
                  max_document_bytes: int = MAX_DOCUMENT_BYTES, follow_symlinks: bool = False) -> Document:
    """A file (any supported format, whatever its name) or a folder (its readable files). A folder
    is read as regular files only, its links followed within it (`follow_symlinks`: anywhere)."""
    where = str(path)
    target = Path(path)
    limit = max_document_bytes
    if pages:
        formats.parse_pages(pages)  # a malformed range is refused before any file is opened
    if not target.exists():
        raise DocumentError(f"{where} does not exist; give a file, a folder, or `-` for stdin")
    if target.is_dir():
        if pages or max_pages:
            raise DocumentError(f"--pages and --max-pages apply to one PDF; {where} is a folder")

        def read_one(data: bytes, name: str, suffix: str) -> str:
            return document_from_bytes(data, name, suffix, max_document_bytes=limit).text

        text, files, skipped, odd = folder_text(target, where.rstrip("/"), read_one, include, exclude,
                                                follow_symlinks, limit)
        return Document(text, "folder", where, files=files, skipped=skipped, not_regular=odd)
    if include or exclude:
        raise DocumentError(f"--include and --exclude apply to folders; {where} is a file")
    data = read_file(target, where, limit)  # a FIFO or device is refused on its descriptor, never read
    return document_from_bytes(data, where, target.suffix, pages, max_pages, limit)
