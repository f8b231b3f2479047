"""Documents and folders as an attacker or a careless user hands them over, built here as real
files: zip bombs (DOCX, EPUB) and a ZIP whose records lie, HTML nested 1,000 and 100,000 deep,
a sparse file over the size limit, FIFOs, devices and links in a folder, a link loop, a file
whose read fails. Each limit is checked before the work it bounds and refused in one line that
names it and its flag; a folder leaves out what it may not read and says so, never refusing
the whole. Every refusal comes through the CLI before any model loads (--model names nothing)."""
import os
import time
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks.measure import PeakRSS, in_fresh_process
from document_files import SENTENCES
from helpers import one_error_line
from toolkit.cli import cli
from toolkit.cli.ask import ask
from toolkit.cli.generate import generate
from toolkit.cli.summarize import summarize
from toolkit.documents import MAX_DOCUMENT_BYTES, DocumentError, read_document
from toolkit.options import DOCUMENT_OPTIONS

MIB, GIB = 1 << 20, 1 << 30
FLAG = "--max-document-bytes"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def refused(path, *extra, command="summarize") -> str:
    """The one error line of reading `path` through the CLI; exit 2 proves it came before the model."""
    args = {"generate": ["generate", "--prompt-file", path], "ask": ["ask", path, "-q", "Who?"]}.get(command,
                                                                                                  [command, path])
    result = invoke(*args, *extra, "--model", Path(path).parent / "no-such-model")
    assert result.exit_code == 2, result.output
    return one_error_line(result)


def zip_with(path: Path, members: dict, big: tuple = (), level: int = 9, zip64: bool = True) -> Path:
    """A ZIP of small members and one `big` (name, bytes) of zeros, written in 16 MiB chunks: a
    2 GiB member costs a few MB on disk and never 2 GiB anywhere."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if big:
            name, size = big
            zeros = bytes(16 * MIB)
            with archive.open(name, "w", force_zip64=zip64) as member:
                for _ in range(size // len(zeros)):
                    member.write(zeros)
    return path


DOCX = {"[Content_Types].xml": "<Types/>"}
EPUB = {"mimetype": "application/epub+zip", "META-INF/container.xml": "<container/>"}


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bombs")
    return {"docx-2GiB": zip_with(d / "bomb.docx", DOCX, ("word/document.xml", 2 * GIB)),
            "epub-64MiB": zip_with(d / "bomb.epub", EPUB, ("OEBPS/chapter.xhtml", 64 * MIB))}


def test_a_docx_expanding_to_2_gib_is_refused_from_its_records(bombs):
    path = bombs["docx-2GiB"]
    assert path.stat().st_size < 4 * MIB
    line = refused(path)
    assert "would expand to 2 GiB when unzipped" in line and f"over {FLAG} (512 MiB)" in line
    # raised past 2 GiB, the ratio still gives it away: over 1/32 of the limit, at most 100 times
    line = refused(path, FLAG, 4 * GIB)
    assert "zip bomb's ratio" in line and "at most 100 times" in line and FLAG in line
    with pytest.raises(DocumentError, match="would expand to 2 GiB"):
        read_document(path)


def _peak_reading(path: str) -> dict:
    """In a fresh process: the peak RSS of reading the bomb, over what the process held before."""
    with PeakRSS() as peak:
        try:
            read_document(path)
            message = None
        except DocumentError as err:
            message = str(err)
    return {"delta": peak.delta, "base": peak.base, "message": message}


def test_reading_the_2_gib_bomb_stays_under_200_mb_above_the_start(bombs):
    found = in_fresh_process(_peak_reading, str(bombs["docx-2GiB"]), timeout=300)
    assert found["message"] and "would expand to 2 GiB" in found["message"]
    assert found["delta"] < 200 * 10**6, f"peak {found['delta'] / MIB:.1f} MiB over the start"


def test_an_epub_bomb_is_refused_by_its_ratio_in_a_file_and_in_a_folder(bombs, tmp_path):
    line = refused(bombs["epub-64MiB"])
    assert "OEBPS/chapter.xhtml" in line and "zip bomb's ratio" in line and FLAG in line
    folder = tmp_path / "books"
    folder.mkdir()
    os.link(bombs["epub-64MiB"], folder / "bomb.epub")
    (folder / "notes.md").write_text(SENTENCES[0])
    doc = read_document(folder)
    assert doc.files == ("notes.md",) and "zip bomb's ratio" in doc.skipped[0]


def _lying(path: Path) -> Path:
    """A DOCX whose records say its 64 MiB member is 1,000 bytes (the CRC is the real one's)."""
    zip_with(path, DOCX, ("word/document.xml", 64 * MIB), zip64=False)  # sizes in the records themselves
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("word/document.xml")
        local, central = info.header_offset, data.rindex(b"PK\x01\x02")  # the last member's record
    for at in (local + 22, central + 24):  # uncompressed size in the local and the central record
        assert data[at:at + 4] == (64 * MIB).to_bytes(4, "little")
        data[at:at + 4] = (1000).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


def test_a_zip_whose_records_lie_is_stopped_by_the_bounded_read(tmp_path):
    path = _lying(tmp_path / "lying.docx")
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("word/document.xml").file_size == 1000
    line = refused(path)
    assert "damaged or crafted" in line and "word/document.xml" in line and "CRC" in line


def test_ordinary_documents_within_small_limits(tmp_path):
    import document_files as make

    docx = make.docx(tmp_path / "minutes.docx", "Minutes", [("Costs", SENTENCES[:2])])
    assert "# Minutes" in read_document(docx).text
    with pytest.raises(DocumentError, match=f"is .* over {FLAG} \\(1 KiB\\)"):
        read_document(docx, max_document_bytes=1024)  # the file itself is larger: refused from stat
    assert "would expand" in refused(docx, FLAG, docx.stat().st_size)  # fits, but not once unzipped


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_html_is_read_fast_without_recursion(tmp_path, depth):
    html = f"<html><head><title>Deep</title></head><body>{'<div>' * depth}<h2>Bottom</h2><p>{SENTENCES[0]}</p>" \
           f"{'</div>' * depth}<ul><li>{SENTENCES[1]}</li></ul></body></html>"
    path = tmp_path / "deep.html"
    path.write_text(html)
    started = time.perf_counter()
    doc = read_document(path)
    assert time.perf_counter() - started < 30  # about 1 s per 100,000 levels; today's reader never got there
    assert doc.text.split("\n\n") == ["# Deep", "## Bottom", SENTENCES[0], f"- {SENTENCES[1]}"]
    result = invoke("generate", "--prompt-file", path, "--model", tmp_path / "no-such-model")
    assert "no-such-model" in one_error_line(result)  # read whole; what stops it is the missing model
    unclosed = tmp_path / "unclosed.html"
    unclosed.write_text("<body>" + "<span><b>" * depth + SENTENCES[2])
    assert read_document(unclosed).text == SENTENCES[2]


def test_a_file_over_the_limit_is_refused_from_its_size_before_a_byte_is_read(tmp_path):
    big = tmp_path / "huge.txt"
    with open(big, "wb") as handle:
        handle.truncate(600 * MIB)  # sparse: nothing is written
    started = time.perf_counter()
    line = refused(big)
    assert f"is 600 MiB, over {FLAG} (512 MiB)" in line and time.perf_counter() - started < 5
    folder = tmp_path / "mixed"
    folder.mkdir()
    os.rename(big, folder / "huge.txt")
    (folder / "a.md").write_text(SENTENCES[0] * 10)
    (folder / "b.md").write_text(SENTENCES[1] * 10)
    doc = read_document(folder)
    assert doc.files == ("a.md", "b.md") and doc.skipped == (f"huge.txt (600 MiB, over {FLAG} (512 MiB))",)
    with pytest.raises(DocumentError, match=f"folder .* holds more than {FLAG} \\(1000 bytes\\) .* at b.md"):
        read_document(folder, max_document_bytes=1000)  # each file fits, the two together do not
    assert "holds more than" in refused(folder, FLAG, 1000, command="ask")


def test_stdin_is_read_no_further_than_the_limit():
    result = CliRunner().invoke(cli, ["summarize", "-", FLAG, "100", "--model", "no-such-model"], input="x" * 5000)
    assert result.exit_code == 2 and f"standard input is more than 100 bytes, over {FLAG}" in one_error_line(result)


@pytest.fixture
def hostile_folder(tmp_path):
    """A folder with a document, a FIFO, links in and out, a link to /dev/zero, a loop, a broken link."""
    root, outside = tmp_path / "folder", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "notes.md").write_text(SENTENCES[0])
    (root / "sub" / "inner.md").write_text(SENTENCES[1])
    (outside / "secret.txt").write_text("the outside secret")
    os.mkfifo(root / "pipe.txt")
    (root / "to-inner.md").symlink_to(root / "sub" / "inner.md")
    (root / "to-secret.txt").symlink_to(outside / "secret.txt")
    (root / "to-outside").symlink_to(outside)
    (root / "zero.txt").symlink_to("/dev/zero")
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    (root / "broken.md").symlink_to(root / "nothing-here")
    (root / "sub" / "up").symlink_to(root)  # a folder loop, once links may leave
    return root


@pytest.mark.timeout(120)
def test_a_folder_reads_regular_files_and_links_that_stay_inside(hostile_folder):
    doc = read_document(hostile_folder)
    assert doc.files == ("notes.md", "sub/inner.md", "to-inner.md")
    assert "secret" not in doc.text
    assert doc.not_regular == ("pipe.txt (a FIFO (named pipe))",)
    reasons = dict(entry.split(" (", 1) for entry in doc.skipped)
    assert reasons["loop-a"] == reasons["loop-b"] == "a symbolic link loop)"
    assert reasons["broken.md"] == "a broken symbolic link)"
    for name in ("to-secret.txt", "to-outside", "zero.txt"):
        assert reasons[name] == "a link to outside the folder; --follow-symlinks reads it)", name
    assert reasons["sub/up/"].startswith("a link to a folder inside this one")


@pytest.mark.timeout(120)
def test_follow_symlinks_reads_outside_but_never_a_device_nor_a_folder_twice(hostile_folder):
    doc = read_document(hostile_folder, follow_symlinks=True)
    assert doc.files == ("notes.md", "sub/inner.md", "to-inner.md", "to-outside/secret.txt", "to-secret.txt")
    assert doc.not_regular == ("pipe.txt (a FIFO (named pipe))", "zero.txt (a character device)")
    assert any(entry.startswith("sub/up/ (a folder already read") for entry in doc.skipped)


@pytest.mark.timeout(120)
def test_the_cli_warns_in_one_line_for_what_is_not_a_regular_file(hostile_folder):
    result = invoke("summarize", hostile_folder, "--model", hostile_folder / "no-such-model")
    notes = [line for line in result.stderr.splitlines() if line.startswith("lctk: left out")]
    odd = [line for line in notes if "not a regular file" in line]
    assert odd == ["lctk: left out what is not a regular file (never opened): pipe.txt (a FIFO (named pipe))"]
    assert "lctk: left out loop-a (a symbolic link loop)" in notes
    assert "no-such-model" in one_error_line(result)  # the folder was read; the model is what is missing
    line = refused(hostile_folder / "pipe.txt")  # named directly: refused on its type, never opened
    assert "is a FIFO (named pipe), not a regular file" in line
    assert "is a character device" in refused(hostile_folder / "zero.txt", command="generate")


@pytest.mark.timeout(120)
def test_a_file_whose_read_fails_is_left_out_not_the_folder(tmp_path):
    root = tmp_path / "folder"
    root.mkdir()
    (root / "notes.md").write_text(SENTENCES[0])
    (root / "memory.txt").symlink_to("/proc/self/mem")  # a regular file whose every read at 0 fails (EIO)
    doc = read_document(root, follow_symlinks=True)
    assert doc.files == ("notes.md",) and doc.skipped == ("memory.txt (cannot be read (Input/output error))",)
    if os.geteuid() == 0:
        pytest.skip("permission bits do not stop root: the unreadable-by-mode case needs another user")
    locked = root / "locked.md"
    locked.write_text(SENTENCES[1])
    locked.chmod(0)
    assert "locked.md (cannot be read (Permission denied))" in read_document(root).skipped


def test_the_document_options_are_declared_once_and_offered_where_documents_are_read():
    assert set(DOCUMENT_OPTIONS) == {"max_document_bytes", "follow_symlinks"}
    assert DOCUMENT_OPTIONS["max_document_bytes"].default == MAX_DOCUMENT_BYTES == 512 * MIB
    for command in (summarize, ask, generate):
        found = {p.name: p for p in command.params}
        for name, option in DOCUMENT_OPTIONS.items():
            default = found[name].to_info_dict()["default"] or False  # a flag not given: click's "unset"
            assert found[name].help == option.help and default == option.default, (command.name, name)
    result = invoke("summarize", "x", FLAG, "0")
    assert result.exit_code == 2 and DOCUMENT_OPTIONS["max_document_bytes"].problem(0) in result.stderr


def test_a_zip_listing_too_many_members_is_refused_before_they_are_read(tmp_path):
    members = {**DOCX, "word/document.xml": "<w:document/>", **{f"word/media/{n}.bin": "" for n in range(1100)}}
    path = zip_with(tmp_path / "many.docx", members)
    line = refused(path, FLAG, MIB)  # one member per 4 KiB of the limit, and at least 1,000
    assert "lists 1102 members, more than the 1000 allowed" in line and FLAG in line


@pytest.mark.parametrize("unit", ["<a", "<!--", "<?x", "</b", "<a x='"])
def test_a_construct_left_open_to_the_end_is_dropped_in_linear_time(tmp_path, unit):
    """Python's html.parser before 3.11.13/3.12.11 retried every later "<" at the end of the
    file (80 KB of "<a": 8 s); an open tag or comment now runs to the end, as in a browser."""
    path = tmp_path / "open.html"
    path.write_text(f"<body><p>{SENTENCES[0]}</p>" + unit * 100_000)
    started = time.perf_counter()
    assert read_document(path).text == SENTENCES[0]
    assert time.perf_counter() - started < 10
