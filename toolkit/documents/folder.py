"""A folder as one document: its readable files in a stable order, each introduced by its
relative path; hidden files, binaries and what the top .gitignore ignores are left out."""
from __future__ import annotations

import os
from pathlib import Path

from .base import FILE_MARK, DocumentError


def _spec(lines):
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(lines) if lines else None


def folder_files(root: Path, include=(), exclude=()) -> tuple[list[str], list[str]]:
    """(relative paths to read, "path (why)" for files left out), both sorted; patterns are gitignore-style."""
    ignore_file = root / ".gitignore"
    ignored = _spec(ignore_file.read_text(errors="replace").splitlines() if ignore_file.is_file() else [])
    wanted, unwanted = _spec(list(include)), _spec(list(exclude))
    chosen, skipped = [], []
    for folder, dirs, files in os.walk(root):
        base = Path(folder).relative_to(root)
        keep = []
        for name in sorted(dirs):
            rel = (base / name).as_posix()
            if name.startswith(".") or (ignored and ignored.match_file(rel + "/")) or \
                    (unwanted and unwanted.match_file(rel + "/")):
                continue
            keep.append(name)
        dirs[:] = keep
        for name in files:
            rel = (base / name).as_posix()
            if wanted and not wanted.match_file(rel):
                continue
            if unwanted and unwanted.match_file(rel):
                continue
            if name.startswith(".") and not (wanted and wanted.match_file(rel)):
                continue
            if ignored and ignored.match_file(rel):
                continue
            chosen.append(rel)
    return sorted(chosen, key=lambda r: r.split("/")), skipped


def folder_text(root: Path, where: str, read_one, include=(), exclude=()) -> tuple[str, tuple, tuple]:
    """(text, files read, files skipped); read_one(path, where) -> text reads each file by its content."""
    paths, skipped = folder_files(root, include, exclude)
    parts, read = [], []
    for rel in paths:
        try:
            text = read_one(root / rel, f"{where}/{rel}")
        except DocumentError as err:
            why = str(err).split(";")[0].removeprefix(f"{where}/{rel}").strip(" :")
            skipped.append(f"{rel} ({why})")
            continue
        parts.append(f"{FILE_MARK.format(rel)}\n{text.strip()}")
        read.append(rel)
    if not parts:
        what = f"; left out: {', '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}" if skipped else ""
        raise DocumentError(f"folder {where} has no readable documents{what}; check --include/--exclude "
                            "and its .gitignore")
    return "\n\n".join(parts), tuple(read), tuple(skipped)
