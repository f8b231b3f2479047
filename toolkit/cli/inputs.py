"""What the commands read and write: a document (file, folder or stdin; stdin read by rank 0
and sent to the others), how much of it, and where a result may be written. What a folder
leaves out is said on stderr by rank 0, before any model loads."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..distributed.launcher import init_process_group, is_main, launcher_env
from ..documents import Document, DocumentError, read_document, read_stdin
from ..options import DOCUMENT_OPTIONS
from .flags import declared


def _stdin_stream():
    stream = sys.stdin
    return getattr(stream, "buffer", stream) if stream is not None else None


def document_options(command):
    """How much of a document to read: pages of a PDF, files of a folder; and the limits of
    toolkit.options' document options (--max-document-bytes, --follow-symlinks)."""
    options = [
        click.option("--pages", metavar="RANGES", help="PDF pages to read, e.g. 3-17 or 1-3,9,12- (1-based)."),
        click.option("--max-pages", type=click.IntRange(min=1), metavar="N", help="Read at most N pages of a PDF."),
        click.option("--include", multiple=True, metavar="GLOB", help="Folder: read only files matching this "
                     "gitignore-style pattern (repeatable), e.g. '*.py' or 'docs/**'."),
        click.option("--exclude", multiple=True, metavar="GLOB", help="Folder: leave out files matching this "
                     "pattern (repeatable); hidden files and the folder's .gitignore are always left out."),
    ]
    for option in reversed(options):
        command = option(command)
    return declared(*DOCUMENT_OPTIONS)(command)


def read_input(path: str, timeout_s: float, pages=None, max_pages=None, include=(), exclude=(),
               max_document_bytes: int = DOCUMENT_OPTIONS["max_document_bytes"].default,
               follow_symlinks: bool = False) -> Document:
    """A file or folder, or `-` for stdin; stdin is read by rank 0 and sent to the others (they see no input)."""
    if path != "-":
        document = read_document(path, pages=pages, max_pages=max_pages, include=include, exclude=exclude,
                                 max_document_bytes=max_document_bytes, follow_symlinks=follow_symlinks)
        if is_main():
            for line in document.notices():
                click.echo(f"lctk: {line}", err=True)
        return document
    if include or exclude:
        raise DocumentError("--include and --exclude apply to folders; standard input is one document")

    def from_stdin():
        stream = _stdin_stream()
        if stream is None:
            raise DocumentError("standard input is empty: give a document with some text")
        return read_stdin(stream, pages, max_pages, max_document_bytes)

    if launcher_env()["world"] == 1:
        return from_stdin()
    from ..distributed.comm import broadcast_object, world_group  # no model (nor its topology) yet

    init_process_group(timeout_s)
    payload = None
    if is_main():
        try:
            payload = ("ok", from_stdin())
        except DocumentError as err:
            payload = ("error", str(err))
    kind, value = broadcast_object(payload, world_group())
    if kind == "error":
        raise DocumentError(value)
    return value


def check_output_path(path: str | None):
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise DocumentError(f"--output {path} is a folder; give a file name")
    if not target.absolute().parent.is_dir():
        raise DocumentError(f"--output {path}: folder {target.absolute().parent} does not exist")
