"""Which reader a document needs, from its bytes: the suffix may be missing or lie."""
from __future__ import annotations

import re

from .base import DocumentError
from .limits import MAX_DOCUMENT_BYTES, open_zip

# formats we recognise but cannot read, and what to do instead
_REFUSED = [
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive"), (b"\xfd7zXZ", "an xz archive"), (b"7z\xbc\xaf", "a 7-Zip archive"),
    (b"\x7fELF", "a program (ELF binary)"), (b"Rar!", "a RAR archive"),
    (b"\xd0\xcf\x11\xe0", "a legacy Office file (.doc/.xls/.ppt)"),
]
_HTML_START = re.compile(r"^\s*(<\?xml[^>]*>\s*)?(<!--.*?-->\s*)*<(!doctype\s+html|html[\s>])", re.I | re.S)
_HTML_TAGS = re.compile(r"<(head|body|p|div|h[1-6])[\s>]", re.I)
HTML_SUFFIXES = (".html", ".htm", ".xhtml")


def _zip_kind(data: bytes, where: str, limit: int) -> str:
    """docx or epub, from the names inside; the archive's limits are checked before any member is read."""
    with open_zip(data, where, limit) as archive:
        names = set(archive.namelist())
        if "word/document.xml" in names:
            return "docx"
        if "mimetype" in names:
            with archive.open("mimetype") as member:
                mimetype = member.read(64).strip()
        else:
            mimetype = b""
        if mimetype == b"application/epub+zip" or "META-INF/container.xml" in names:
            return "epub"
    raise DocumentError(f"{where} is a ZIP archive but not a DOCX or EPUB document; "
                        "unpack it and give the folder instead")


def decode_text(data: bytes, where: str) -> str:
    """Bytes -> text: UTF-8 with or without BOM, UTF-16 with BOM; binary and other encodings refused."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError:
            raise DocumentError(f"{where} has a UTF-16 byte-order mark but is not valid UTF-16; "
                                "convert it first, e.g. `iconv -t UTF-8`") from None
    elif b"\x00" in data[:1 << 20]:
        raise DocumentError(f"{where} looks like a binary file (it contains NUL bytes); "
                            "give a text, PDF, HTML, DOCX or EPUB document")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise DocumentError(f"{where} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                                "convert it first, e.g. `iconv -t UTF-8`") from None
    if not text.strip():
        raise DocumentError(f"{where} is empty: give a document with some text")
    return text


def detect(data: bytes, where: str, suffix: str = "", limit: int = MAX_DOCUMENT_BYTES) -> tuple[str, str | None]:
    """(kind, text): kind is text | html | pdf | docx | epub; text is set for the text kinds. A ZIP's
    members are held to `limit` (the bytes they may expand to) here, before any reader opens it."""
    if not data.strip():
        raise DocumentError(f"{where} is empty: give a document with some text")
    if b"%PDF-" in data[:1024]:
        return "pdf", None
    if data.startswith(b"PK\x03\x04"):
        return _zip_kind(data, where, limit), None
    for magic, what in _REFUSED:
        if data.startswith(magic):
            raise DocumentError(f"{where} is {what}, not a document; give a text, PDF, HTML, DOCX or EPUB file")
    text = decode_text(data, where)
    head = text[:4096]
    if _HTML_START.match(head) or (suffix.lower() in HTML_SUFFIXES and _HTML_TAGS.search(head)):
        return "html", text
    return "text", text
