"""Documents as people have them, read by content whatever their name: text, PDF, HTML, DOCX,
EPUB and folders, with headings, page and file markers kept; each refusal one line, exit 2,
before any model loads. Sections follow the document's own boundaries."""
import re

import pytest
from click.testing import CliRunner

import document_files as make
from document_files import SENTENCES
from helpers import one_error_line
from toolkit.cli import cli
from toolkit.documents import Document, DocumentError, read_document


def words(text: str) -> str:
    return " ".join(text.split())


def in_order(text: str, sentences) -> bool:
    flat, at = words(text), 0
    for sentence in sentences:
        at = flat.find(sentence, at)
        if at < 0:
            return False
        at += len(sentence)
    return True


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    make.pdf(d / "report.pdf", [" ".join(SENTENCES[:2]), " ".join(SENTENCES[2:4]), " ".join(SENTENCES[4:])])
    make.pdf(d / "really-a-pdf.txt", [SENTENCES[0]])
    make.scanned_pdf(d / "scan.pdf")
    make.encrypted_pdf(d / "locked.pdf", d / "report.pdf")
    make.docx(d / "minutes.docx", "Harbour minutes", [("Opening", SENTENCES[:3]), ("Costs", SENTENCES[3:])],
              table=[["Year", "Ships"], ["2024", "31"]])
    make.epub(d / "book.epub", "The harbour", [("Spring", SENTENCES[:3]), ("Winter", SENTENCES[3:])])
    (d / "page.html").write_text(make.html_page("Harbour news", "The breakwater", SENTENCES))
    (d / "saved-page").write_text(make.html_page("Harbour news", "The breakwater", SENTENCES))
    (d / "GPL-3").write_text("GNU GENERAL PUBLIC LICENSE\n\n" + "\n\n".join(SENTENCES))
    (d / "utf16.txt").write_bytes("\n\n".join(SENTENCES).encode("utf-16"))
    (d / "bom.md").write_bytes(b"\xef\xbb\xbf" + "# Notes\n\n".encode() + SENTENCES[0].encode())
    (d / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (d / "nul.txt").write_bytes(b"text\x00\x01\x02 more")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (d / "empty.md").write_text(" \n\n")
    (d / "archive.zip").write_bytes(_zip({"a.txt": b"hello"}))
    return d


def _zip(files: dict) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_pdf_is_read_page_by_page_with_markers(docs):
    doc = read_document(docs / "report.pdf")
    assert doc.kind == "pdf" and doc.pages == (1, 2, 3)
    assert in_order(doc.text, SENTENCES)
    assert [int(n) for n in re.findall(r"^\[page (\d+)\]$", doc.text, re.M)] == [1, 2, 3]
    assert SENTENCES[2] in words(doc.text.split("[page 2]")[1].split("[page 3]")[0])
    picked = read_document(docs / "report.pdf", pages="2-3")
    assert picked.pages == (2, 3) and SENTENCES[0] not in words(picked.text) and in_order(picked.text, SENTENCES[2:])
    assert read_document(docs / "report.pdf", pages="1,3").pages == (1, 3)
    assert read_document(docs / "report.pdf", pages="2-", max_pages=1).pages == (2,)


@pytest.mark.parametrize("name, kind, heading", [
    ("minutes.docx", "docx", "# Opening"), ("book.epub", "epub", "# Spring"), ("page.html", "html", "# The breakwater"),
    ("saved-page", "html", "# The breakwater"), ("GPL-3", "text", None), ("utf16.txt", "text", None),
    ("really-a-pdf.txt", "pdf", None),
])
def test_each_format_is_read_by_content_with_its_sentences_in_order(docs, name, kind, heading):
    doc = read_document(docs / name)
    assert doc.kind == kind
    expected = SENTENCES[:1] if name == "really-a-pdf.txt" else SENTENCES
    assert in_order(doc.text, expected), doc.text
    if heading:
        assert heading in doc.text.splitlines()


def test_structure_is_kept_and_noise_dropped(docs):
    html = read_document(docs / "page.html").text
    assert "do not read me" not in html and "About us" not in html and "Copyright" not in html
    assert "color: red" not in html and "Year | Ships\n2024 | 31" in html
    assert html.splitlines()[0] == "# The breakwater" and "## Table" in html.splitlines()
    docx = read_document(docs / "minutes.docx").text
    assert docx.splitlines()[0] == "# Harbour minutes" and "Year | Ships\n2024 | 31" in docx
    epub = read_document(docs / "book.epub").text
    assert epub.index("# Spring") < epub.index(SENTENCES[0]) < epub.index("# Winter") < epub.index(SENTENCES[5])
    assert read_document(docs / "bom.md").text.startswith("# Notes")  # the BOM is gone


@pytest.fixture
def folder(tmp_path):
    (tmp_path / ".gitignore").write_text("build/\n*.log\n!keep.log\n")
    files = {"README": "# Project\n\n" + SENTENCES[0], "src/app.py": "# a comment, not a heading\nprint(1)\n",
             "docs/guide.md": "# Guide\n\n" + SENTENCES[1], "docs/a/deep.md": SENTENCES[2],
             "build/out.txt": "generated", "debug.log": "noise", "keep.log": SENTENCES[3],
             ".hidden/secret.txt": "secret", ".env": "TOKEN=1"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    make.docx(tmp_path / "docs" / "minutes.docx", "Minutes", [("Costs", SENTENCES[4:5])])
    return tmp_path


def test_a_folder_is_its_files_in_a_stable_order_under_their_paths(folder):
    doc = read_document(folder)
    assert doc.files == ("README", "docs/a/deep.md", "docs/guide.md", "docs/minutes.docx", "keep.log", "src/app.py")
    assert doc.skipped == ("logo.png (is a PNG image, not a document)",)
    marks = re.findall(r"^\[file (.+)\]$", doc.text, re.M)
    assert marks == list(doc.files)
    for hidden in ("secret", "TOKEN", "generated", "noise"):
        assert hidden not in doc.text
    assert in_order(doc.text, [SENTENCES[0], SENTENCES[2], SENTENCES[1], SENTENCES[4], SENTENCES[3]])
    assert read_document(folder, include=["*.md"]).files == ("docs/a/deep.md", "docs/guide.md")
    assert read_document(folder, exclude=["docs/"]).files == ("README", "keep.log", "src/app.py")
    assert read_document(folder, include=[".env"]).files == (".env",)  # named explicitly: read


def test_sections_follow_pages_files_and_headings():
    from transformers import AutoTokenizer

    from helpers import demo_folder
    from toolkit.summarize import split_sections

    tok = AutoTokenizer.from_pretrained(demo_folder())
    filler = " ".join(SENTENCES)
    pdf_text = "\n\n".join(f"[page {n}]\n{filler} {filler}" for n in range(1, 9))
    sections = split_sections(tok, pdf_text, 400)
    assert len(sections) >= 2 and all(s.tokens <= 400 for s in sections)
    for s in sections:  # each section starts at a page and covers whole pages, in order
        assert s.text.startswith(f"[page {s.pages[0]}]") and s.text.count("[page") == s.pages[1] - s.pages[0] + 1
    assert [p for s in sections for p in range(s.pages[0], s.pages[1] + 1)] == list(range(1, 9))
    folder_text = "\n\n".join(f"[file f{n}.md]\n# Part {n}\n\n{filler}\n\n{filler}" for n in range(6))
    sections = split_sections(tok, folder_text, 300)
    assert all(s.text.startswith("[file ") for s in sections)
    assert [f for s in sections for f in s.files] == [f"f{n}.md" for n in range(6)]
    assert sections[0].to_dict()["files"] == list(sections[0].files) and sections[0].title == "f0.md"
    book = "\n\n".join(f"# Chapter {n}\n\n" + "\n\n".join([filler] * 3) for n in range(5))
    titles = [s.title for s in split_sections(tok, book, 350)]
    assert titles == [f"Chapter {n}" for n in range(5)]
    # a page too long for a section is cut inside, and the next section says which page it is on
    long_page = "[page 4]\n" + "\n".join([filler] * 12)
    parts = split_sections(tok, long_page, 200)
    assert len(parts) > 1 and all(p.text.startswith("[page 4]") and p.pages == (4, 4) for p in parts)


def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


@pytest.mark.parametrize("name, extra, words_", [
    ("scan.pdf", [], "no text layer"),
    ("locked.pdf", [], "encrypted PDF"),
    ("image.txt", [], "PNG image"),
    ("nul.txt", [], "binary"),
    ("latin1.txt", [], "not UTF-8"),
    ("empty.md", [], "is empty"),
    ("archive.zip", [], "ZIP archive but not a DOCX or EPUB"),
    ("report.pdf", ["--pages", "7-9"], "has 3 pages"),
    ("report.pdf", ["--pages", "x-2"], "--pages 'x-2'"),
    ("GPL-3", ["--pages", "1"], "apply to PDF documents"),
    ("GPL-3", ["--include", "*.md"], "apply to folders"),
    ("missing.pdf", [], "does not exist"),
])
def test_refusals_are_one_line_exit_2_before_any_model_loads(docs, name, extra, words_):
    # --model names nothing: a refusal about the document proves it came before any loading
    for command in (["summarize", docs / name], ["generate", "--prompt-file", docs / name]):
        if command[0] == "generate" and extra:
            continue
        result = invoke(*command, *extra, "--model", docs / "no-such-model")
        assert result.exit_code == 2, result.output
        assert words_ in one_error_line(result)


def test_stdin_is_read_by_content_too(docs):
    from toolkit.cli.inputs import read_input

    import sys
    from io import BytesIO, TextIOWrapper

    saved = sys.stdin
    try:
        sys.stdin = TextIOWrapper(BytesIO((docs / "report.pdf").read_bytes()))
        doc = read_input("-", 60)
    finally:
        sys.stdin = saved
    assert isinstance(doc, Document) and doc.kind == "pdf" and doc.pages == (1, 2, 3)
    with pytest.raises(DocumentError, match="apply to folders"):
        read_input("-", 60, include=("*.md",))
