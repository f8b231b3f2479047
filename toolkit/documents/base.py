"""What every reader returns, the one error they raise, the markers they leave in the text
(so sections and answers can cite pages and files), and the one atomic writer."""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PAGE_MARK = "[page {}]"          # a PDF page starts: the model cites it, sections report it
FILE_MARK = "[file {}]"          # a folder's file starts, by its relative path
PAGE_LINE = re.compile(r"^\[page (\d+)\]$")
FILE_LINE = re.compile(r"^\[file (.+)\]$")


class DocumentError(ValueError):
    """An input document we cannot read as text; the message says what would work."""


@dataclass(frozen=True)
class Document:
    """A document as text, with where it came from. `pages` and `files` list what the text holds."""
    text: str
    kind: str                                   # text | pdf | html | docx | epub | folder
    source: str
    pages: tuple[int, ...] = ()
    files: tuple[str, ...] = ()
    skipped: tuple[str, ...] = field(default=())  # a folder's files left out, each "path (why)"
    not_regular: tuple[str, ...] = field(default=())  # a folder's FIFOs, devices, sockets: "path (what)", unopened

    @property
    def description(self) -> str:
        """One line for the log: what was read."""
        if self.kind == "folder":
            left = len(self.skipped) + len(self.not_regular)
            extra = f", {left} skipped" if left else ""
            return f"{self.source}: {len(self.files)} files{extra}"
        if self.kind == "pdf":
            return f"{self.source}: PDF, {len(self.pages)} pages with text"
        return f"{self.source}: {self.kind}"

    def notices(self) -> list[str]:
        """What was left out, for the log: a line per file, one line for all that are not regular files."""
        lines = [f"left out {entry}" for entry in self.skipped]
        if self.not_regular:
            lines.append("left out what is not a regular file (never opened): " + ", ".join(self.not_regular))
        return lines


def write_atomic(path, text: str) -> None:
    """Write through a temp file in the same folder, fsync, rename: readers never see half a file."""
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
