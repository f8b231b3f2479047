"""A document's text as blocks (paragraphs with the headings and markers that open them),
each knowing its page, its file and the heading it sits under: what sections are cut on."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from .base import FILE_LINE, PAGE_LINE

_HEADING = re.compile(r"^(#{1,6})\s+(\S.*?)\s*#*\s*$")
# files whose `#` lines are headings; in code they are comments
_PROSE = {"", ".md", ".markdown", ".txt", ".text", ".rst", ".org", ".adoc", ".pdf", ".docx", ".html", ".htm",
          ".xhtml", ".epub"}
FILE, PAGE = 5, 1  # how good a place each is to start a section; a heading of level n: 6 - n (h1: 4 ... h4+: 2)


@dataclass(frozen=True)
class Block:
    text: str
    strength: int           # 0: a paragraph; see FILE, PAGE and heading levels
    page: int | None        # the page it starts on
    file: str | None        # the file it is in
    heading: str | None     # the heading it sits under (its own, when it opens with one)
    opens: str | None       # the file or heading it opens, if any: a section starting here is named so


def _heading_strength(level: int) -> int:
    return max(2, 6 - level)


def blocks(text: str) -> list[Block]:
    out: list[Block] = []
    lines: list[str] = []
    body = False
    page = file = heading = opens = None
    strength = 0

    def flush():
        nonlocal lines, body, strength, opens
        if lines:
            out.append(Block("\n".join(lines), strength, page, file, heading, opens))
        lines, body, strength, opens = [], False, 0, None

    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            if body:
                flush()
            continue
        found_file, found_page = FILE_LINE.match(stripped), PAGE_LINE.match(stripped)
        prose = file is None or PurePosixPath(file).suffix.lower() in _PROSE
        found_heading = _HEADING.match(stripped) if prose and not (found_file or found_page) else None
        if (found_file or found_page or found_heading) and body:
            flush()
        if found_file:
            file, page, heading, opens = found_file[1], None, None, found_file[1]
            strength = max(strength, FILE)
        elif found_page:
            page = int(found_page[1])
            strength = max(strength, PAGE)
        elif found_heading:
            heading = found_heading[2]
            opens = opens or heading
            strength = max(strength, _heading_strength(len(found_heading[1])))
        else:
            body = True
        lines.append(line)
    flush()
    return out


def has_pages(text: str) -> bool:
    return re.search(r"^\[page \d+\]$", text, re.M) is not None


def has_files(text: str) -> bool:
    return re.search(r"^\[file .+\]$", text, re.M) is not None
