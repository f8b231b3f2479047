"""Sections for map-reduce that follow the document: cut at files, chapters, headings and
pages before paragraphs, and at token windows only inside a block too long for any section."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..documents.base import FILE_MARK, PAGE_MARK
from ..documents.structure import Block, blocks

MARKER_ALLOWANCE = 24  # tokens for the page/file lines repeated at the top of a section that starts mid-way


@dataclass(frozen=True)
class Section:
    text: str
    title: str
    tokens: int
    pages: tuple[int, int] | None   # first and last page it covers
    files: tuple[str, ...]          # files it covers, in order

    def place(self) -> str:
        """'pages 3-5', 'p. 7', 'src/a.py, src/b.py' or '': where in the document it is."""
        if self.files:
            shown = ", ".join(self.files[:3]) + (f" and {len(self.files) - 3} more" if len(self.files) > 3 else "")
            return shown + (f", {_pages(self.pages)}" if self.pages else "")
        return _pages(self.pages) if self.pages else ""

    def to_dict(self) -> dict:
        out = {"title": self.title, "tokens": self.tokens}
        if self.pages:
            out["pages"] = list(self.pages)
        if self.files:
            out["files"] = list(self.files)
        return out


def _pages(pages) -> str:
    return f"p. {pages[0]}" if pages[0] == pages[1] else f"pages {pages[0]}-{pages[1]}"


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _pieces(tokenizer, block: Block, budget: int) -> list[tuple[Block, int]]:
    """(piece, tokens) of at most `budget` tokens: the block, else its lines, else token windows.
    Only the first piece keeps the block's strength: the rest continue it."""
    n = _count(tokenizer, block.text)
    if n <= budget:
        return [(block, n)]
    lines = block.text.splitlines()
    if len(lines) > 1:
        texts = lines
    else:
        ids = tokenizer(block.text, add_special_tokens=False).input_ids
        texts = [tokenizer.decode(ids[i:i + budget]) for i in range(0, len(ids), budget)]
    out = []
    for i, text in enumerate(texts):
        part = Block(text, block.strength if i == 0 else 0, block.page, block.file, block.heading,
                     block.opens if i == 0 else None)
        out.extend(_pieces(tokenizer, part, budget) if len(lines) > 1 else [(part, _count(tokenizer, text))])
    return out


def _cuts(sizes: list[int], strengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Spans [start, end) of at most `budget`, none under half the even share unless forced: the
    strongest boundary wins (file > chapter > heading > page > paragraph), then the one nearest
    the even share."""
    total = sum(sizes)
    target = total / max(1, math.ceil(total / budget))
    spans, start, n = [], 0, len(sizes)
    while start < n:
        end, size = start, 0
        while end < n and (end == start or size + sizes[end] <= budget):
            size += sizes[end]
            end += 1
        if end == n:
            spans.append((start, n))
            break
        best, best_key, acc = end, None, 0
        for k in range(start + 1, end + 1):
            acc += sizes[k - 1]
            if acc < 0.5 * target:
                continue
            key = (strengths[k], -abs(acc - target))
            if best_key is None or key > best_key:
                best, best_key = k, key
        spans.append((start, best))
        start = best
    return spans


def describe(parts: list[Block], tokens: int, index: int) -> Section:
    """A section over these blocks: its text (with its page/file restated if it starts mid-way) and where it is."""
    first = parts[0]
    lead = []
    if first.file and first.opens != first.file:
        lead.append(FILE_MARK.format(first.file))
    if first.page and not first.text.lstrip().startswith(PAGE_MARK.format(first.page)):
        lead.append(PAGE_MARK.format(first.page))
    text = "\n\n".join(([("\n".join(lead))] if lead else []) + [p.text for p in parts])
    numbers = [p.page for p in parts if p.page]
    files = tuple(dict.fromkeys(p.file for p in parts if p.file))
    pages = (min(numbers), max(numbers)) if numbers else None
    title = first.opens or first.heading or (files[0] if files else None) or \
        (_pages(pages) if pages else f"section {index}")
    return Section(text, title, tokens, pages, files)


def split_sections(tokenizer, text: str, budget: int) -> list[Section]:
    """Cut text into sections of at most ~budget tokens (each restating its page or file when it
    starts mid-way) on the document's own boundaries, of similar sizes."""
    has_places = any(b.page or b.file for b in blocks(text))
    room = budget - MARKER_ALLOWANCE if has_places else budget
    pieces = [p for block in blocks(text) for p in _pieces(tokenizer, block, room)]
    spans = _cuts([n + 1 for _, n in pieces], [b.strength for b, _ in pieces], room)
    return [describe([b for b, _ in pieces[s:e]], sum(n + 1 for _, n in pieces[s:e]), i)
            for i, (s, e) in enumerate(spans, 1)]


def whole(tokenizer, text: str) -> Section:
    """The document as one section (a single pass)."""
    parts = blocks(text) or [Block(text, 0, None, None, None, None)]
    section = describe(parts, _count(tokenizer, text), 1)
    return Section(text, section.title, section.tokens, section.pages, section.files)
