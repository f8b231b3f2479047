"""The one way a command reads a document: a file of any supported kind (chosen by content),
a folder, or stdin bytes; every refusal is one sentence, raised before any model loads."""
from __future__ import annotations

from pathlib import Path

from . import formats
from .base import Document, DocumentError
from .folder import folder_text
from .sniff import detect

FORMATS = ("text (any name: UTF-8, UTF-16 with BOM)", "PDF", "HTML", "DOCX", "EPUB", "a folder")


def document_from_bytes(data: bytes, where: str, suffix: str = "", pages: str | None = None,
                        max_pages: int | None = None) -> Document:
    """Read bytes as whichever format their content is; --pages/--max-pages only apply to a PDF."""
    kind, text = detect(data, where, suffix)
    if kind != "pdf" and (pages or max_pages):
        raise DocumentError(f"--pages and --max-pages apply to PDF documents; {where} is {kind}")
    if kind == "pdf":
        text, numbers = formats.pdf_text(data, where, pages, max_pages)
        return Document(text, kind, where, pages=numbers)
    if kind == "html":
        text = formats.html_text(text, where)
    elif kind == "docx":
        text = formats.docx_text(data, where)
    elif kind == "epub":
        text = formats.epub_text(data, where)
    return Document(text, kind, where)


def _one_file(path: Path, where: str) -> str:
    return document_from_bytes(path.read_bytes(), where, path.suffix).text


def read_document(path, *, pages: str | None = None, max_pages: int | None = None, include=(),
                  exclude=()) -> Document:
    """A file (any supported format, whatever its name) or a folder (its readable files)."""
    where = str(path)
    target = Path(path)
    if pages:
        formats.parse_pages(pages)  # a malformed range is refused before any file is opened
    if not target.exists():
        raise DocumentError(f"{where} does not exist; give a file, a folder, or `-` for stdin")
    if target.is_dir():
        if pages or max_pages:
            raise DocumentError(f"--pages and --max-pages apply to one PDF; {where} is a folder")
        text, files, skipped = folder_text(target, where.rstrip("/"), _one_file, include, exclude)
        return Document(text, "folder", where, files=files, skipped=skipped)
    if include or exclude:
        raise DocumentError(f"--include and --exclude apply to folders; {where} is a file")
    if not target.is_file():
        raise DocumentError(f"{where} is not a regular file; give a file, a folder, or `-` for stdin")
    try:
        data = target.read_bytes()
    except OSError as err:
        raise DocumentError(f"{where} cannot be read ({err.strerror}); check its permissions") from None
    return document_from_bytes(data, where, target.suffix, pages, max_pages)
