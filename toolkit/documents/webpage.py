"""HTML to text in one pass over the parser's events, with no tree and no recursion: a page of
100,000 nested elements costs a list of 100,000 tag names, never a Python stack that deep.

The tokenizer is the standard library's html.parser (what BeautifulSoup's "html.parser" builder
uses), and the rules are that builder's: a void element closes at once, an end tag closes every
element opened after the last open one of its name, a stray end tag is ignored. The text is the
same as a walk of that tree: the <title> heads the page; scripts, menus and the first <head>
are dropped; the root is the first <main>, else <article>, else <body>, else the page;
headings become markdown headings, list items bullets, table rows cells joined by " | ",
<pre> keeps its lines, and every other element's strings join its paragraph."""
from __future__ import annotations

from html.parser import HTMLParser

from .base import DocumentError

_DROP = {"script", "style", "noscript", "template", "nav", "header", "footer", "aside", "form", "svg",
         "iframe", "button", "select", "canvas", "object"}
_DROP_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search"}
_HEADINGS = {f"h{i}": i for i in range(1, 7)}
_BLOCKS = {"p", "li", "pre", "blockquote", "dd", "dt", "figcaption", "caption", "address", "table", "tr",
           "ul", "ol", "dl", "div", "section", "article", "main", "body", "figure", "details", "summary", "tbody",
           *_HEADINGS}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "keygen", "link", "menuitem", "meta", "param",
         "source", "track", "wbr", "basefont", "bgsound", "command", "frame", "image", "isindex", "nextid", "spacer"}
_UNREAD = {"script", "style", "template", "rt", "rp"}  # strings in these are no text of the page (ruby: readings)
_ROOTS = ("main", "article", "body")  # in order of preference; the page itself when none is there


def squash(text: str) -> str:
    return " ".join(text.split())


class _Walker:
    """The blocks under one root, from the events inside it. An element that is not a block
    (or a heading, <pre> or table) takes every string under it whole: `capture` holds it until
    it closes, and what opens inside it only matters to a table (its rows and cells)."""

    def __init__(self, depth: int):
        self.depth, self.out, self.inline = depth, [], []
        self.capture = None      # [kind, depth, strings, rows, {tr depth: row}, [(cell depth, strings)]]
        self.items = []          # (depth, index in out) of the open <li>s

    def flush(self):
        if not self.inline:
            return
        text = squash(" ".join(self.inline))
        if text:
            self.out.append(text)
        self.inline.clear()

    def open(self, name: str, depth: int):
        held = self.capture
        if held is not None:
            if held[0] == "table":
                if name == "tr":
                    held[3].append([])
                    held[4][depth] = held[3][-1]
                elif name in ("td", "th") and depth - 1 in held[4]:  # a cell of the row it sits in directly
                    held[4][depth - 1].append([])
                    held[5].append((depth, held[4][depth - 1][-1]))
            return
        if name not in _BLOCKS:
            self.capture = ["inline", depth]
            return
        self.flush()
        if name in _HEADINGS or name in ("pre", "table"):
            self.capture = [name if name in ("pre", "table") else "heading", depth, [], [], {}, []]
        elif name == "li":
            self.items.append((depth, len(self.out)))

    def text(self, data: str):
        held = self.capture
        if held is None or held[0] == "inline":
            self.inline.append(data)
        elif held[0] == "table":
            for _, strings in held[5]:
                strings.append(data)
        else:
            held[2].append(data)

    def close(self, name: str, depth: int):
        held = self.capture
        if held is not None and held[1] != depth:
            if held[0] == "table":
                held[4].pop(depth, None)
                if held[5] and held[5][-1][0] == depth:
                    held[5].pop()
            return
        if held is not None:
            self.capture = None
            kind = held[0]
            if kind == "heading":
                text = squash(" ".join(held[2]))
                if text:
                    self.out.append(f"{'#' * _HEADINGS[name]} {text}")
            elif kind == "pre":
                text = "".join(held[2]).strip("\n")
                if text.strip():
                    self.out.append(text)
            elif kind == "table":
                rows = [" | ".join(squash(" ".join(cell)) for cell in row) for row in held[3]]
                rows = [r for r in rows if r.strip(" |")]
                if rows:
                    self.out.append("\n".join(rows))
            return
        if name in _BLOCKS:
            self.flush()
            if name == "li" and self.items and self.items[-1][0] == depth:
                _, first = self.items.pop()
                if len(self.out) > first:
                    self.out[first] = "- " + self.out[first]


class _Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []            # the open elements' names
        self.counts: dict[str, int] = {}      # open elements by name (an end tag with none open is ignored)
        self.data: list[str] = []             # text since the last tag: one string, as the tree has it
        self.dropped = None                   # depth of the dropped element we are in
        self.unread = 0                       # open elements whose strings are not text (_UNREAD)
        self.head_seen = False
        self.closed_void: dict[str, int] = {}  # void elements closed at their start: their end tag is no event
        self.title_at, self.title_strings, self.title = None, [], None
        self.best = len(_ROOTS)               # the best root found so far, as its place in _ROOTS (none: the page)
        self.result = _Walker(0)              # that root's walker, whose blocks are the text ...
        self.walker = self.result             # ... fed while its root is open (None once it closed)

    def _end_data(self):
        if self.data:
            text = "".join(self.data)
            self.data.clear()
            if self.unread:
                return
            if self.title_at is not None:
                self.title_strings.append(text)
            if self.dropped is None and self.walker is not None:
                self.walker.text(text)

    def handle_starttag(self, tag, attrs, void=True):
        if self.data:
            self._end_data()
        self.stack.append(tag)
        self.counts[tag] = self.counts.get(tag, 0) + 1
        depth = len(self.stack)
        self.unread += tag in _UNREAD
        if tag == "title" and self.title is None and self.title_at is None:
            self.title_at = depth
        if self.dropped is None:
            role = next((str(v or "").lower() for k, v in reversed(attrs) if k == "role"), "") if attrs else ""
            if tag in _DROP or role in _DROP_ROLES:
                self.dropped = depth
            elif tag == "head" and not self.head_seen:  # the first <head> left once the others are dropped
                self.head_seen, self.dropped = True, depth
            else:
                if self.walker is not None:
                    self.walker.open(tag, depth)
                if tag in _ROOTS and _ROOTS.index(tag) < self.best:  # the first of a better root's name
                    self.best = _ROOTS.index(tag)
                    self.walker = self.result = _Walker(depth)
        if void and tag in _VOID:
            self._pop_to(tag)
            self.closed_void[tag] = self.closed_void.get(tag, 0) + 1

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs, void=False)
        self._pop_to(tag)

    def handle_endtag(self, tag):
        if self.closed_void.get(tag):
            self.closed_void[tag] -= 1
            return
        if self.data:
            self._end_data()
        self._pop_to(tag)

    def _pop_to(self, tag: str):
        if not self.counts.get(tag):
            return
        while self.stack:
            name = self._pop()
            if name == tag:
                return

    def _pop(self) -> str:
        depth = len(self.stack)
        name = self.stack.pop()
        self.counts[name] -= 1
        self.unread -= name in _UNREAD
        if self.title_at == depth:
            self.title, self.title_at = squash(" ".join(self.title_strings)), None
        if self.dropped is not None:
            if self.dropped == depth:
                self.dropped = None
            return name
        walker = self.walker
        if walker is not None:
            if walker.depth == depth:  # its root closed: it takes no more events
                walker.flush()
                self.walker = None
            else:
                walker.close(name, depth)
        return name

    def handle_data(self, data):
        self.data.append(data)

    def handle_comment(self, data):
        self._end_data()

    def handle_decl(self, decl):
        self._end_data()

    def handle_pi(self, data):
        self._end_data()

    def unknown_decl(self, data):
        self._end_data()
        if data.startswith("CDATA["):
            self.data.append(data[len("CDATA["):])
            self._end_data()

    def finish(self) -> None:
        """The end of the file. A tag, comment or declaration still open here runs to the end and is
        dropped, as HTML5 (and Python's own parser from 3.11.13 and 3.12.11) has it; before those,
        close() retried every later "<" against the rest of the file: quadratic (80 KB of "<a" took
        8 s, 160 KB of "<!--" 19 s)."""
        if self.rawdata.startswith("<") and not self.cdata_elem:
            self.rawdata = ""
        self.close()

    def blocks(self) -> tuple[list[str], str]:
        self._end_data()
        while self.stack:
            self._pop()
        self.result.flush()
        return self.result.out, self.title or ""


def html_text(html: str, where: str, title_heading: bool = True) -> str:
    """The main text of a page: <main> or <article> when there is one, without menus or scripts;
    the <title> becomes the first heading unless the page starts with one."""
    page = _Page()
    page.feed(html)
    page.finish()
    blocks, title = page.blocks()
    if not blocks:
        raise DocumentError(f"{where} is an HTML page with no text in it; save the page with its content "
                            "(not just the scripts that load it)")
    if title_heading and title and not blocks[0].startswith("# "):
        blocks.insert(0, f"# {title}")
    return "\n\n".join(blocks)
