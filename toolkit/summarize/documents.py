"""Documents in and out: a file of the supported kinds or stdin bytes read as text (refused
in one clear sentence when empty, binary or not UTF-8, before any model loads), and text
written atomically, so readers never see half a file."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".text")


class DocumentError(ValueError):
    """An input document we cannot read as text; the message says what would work."""


def decode_text(data: bytes, where: str) -> str:
    """Bytes -> text, refusing empty, binary and non-UTF-8 input with one clear sentence."""
    if not data.strip():
        raise DocumentError(f"{where} is empty: give a text document to summarise")
    if b"\x00" in data[:1 << 20]:
        raise DocumentError(f"{where} looks like a binary file (it contains NUL bytes); give a UTF-8 text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DocumentError(f"{where} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                            "convert it first, e.g. `iconv -t UTF-8`") from None
    return text


def read_document(path: str, suffixes: tuple[str, ...] | None = SUPPORTED_SUFFIXES) -> str:
    """Read a text file (`suffixes=None` accepts any name); all checks happen before any model loads."""
    file = Path(path)
    if not file.exists():
        raise DocumentError(f"file {path} does not exist")
    if not file.is_file():
        raise DocumentError(f"{path} is not a file")
    if suffixes and file.suffix.lower() not in suffixes:
        raise DocumentError(f"{path}: unsupported file type {file.suffix or '(none)'!r}; "
                            f"supported: {', '.join(suffixes)} (or `-` for stdin)")
    return decode_text(file.read_bytes(), path)


def write_atomic(path, text: str) -> None:
    """Write through a temp file in the same folder, fsync, rename."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.absolute().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
