"""A folder as one document: its readable files in a stable order, each introduced by its
relative path; hidden files, binaries and what the top .gitignore ignores are left out.

What a folder may hold is not trusted: only regular files are opened (a FIFO, device or socket
is listed, never opened); a symbolic link is followed only when its target stays inside the
folder (`follow_symlinks` allows others, and then a folder reached twice is walked once); a
loop, a broken link or an entry that cannot be read is left out with its reason, never the
whole folder; the files read may hold `limit` bytes in all. The walk keeps its own stack."""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .base import FILE_MARK, DocumentError
from .limits import FLAG, MAX_DOCUMENT_BYTES, kind_of, read_file, size_text


def _spec(lines):
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(lines) if lines else None


@dataclass
class Listing:
    files: list = field(default_factory=list)        # (relative path, path, (dev, inode), size, is a link)
    skipped: list = field(default_factory=list)      # "path (why)"
    not_regular: list = field(default_factory=list)  # "path (what it is)": never opened


_IGNORE_BYTES = 1 << 20


def _inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def _target(path: str, rel: str, root: str, follow: bool, out: Listing):
    """The stat of what a link points to, or None (left out, with the reason in `out`)."""
    try:
        real = os.path.realpath(path, strict=True)
    except OSError as err:
        loop = err.errno == errno.ELOOP
        out.skipped.append(f"{rel} ({'a symbolic link loop' if loop else 'a broken symbolic link'})")
        return None
    if not follow and not _inside(real, root):
        out.skipped.append(f"{rel} (a link to outside the folder; --follow-symlinks reads it)")
        return None
    try:
        return os.stat(real)
    except OSError as err:
        out.skipped.append(f"{rel} (cannot be read: {err.strerror})")
        return None


def _ignore_lines(root: Path, real_root: str, follow: bool, out: Listing) -> list[str]:
    """The top .gitignore's lines, read by the folder's rules too (a regular file within the limit)."""
    path = root / ".gitignore"
    if not os.path.lexists(path):
        return []
    info = _target(str(path), ".gitignore", real_root, follow, out) if path.is_symlink() else os.lstat(path)
    if info is None:
        return []
    if info.st_size > _IGNORE_BYTES:
        out.skipped.append(f".gitignore ({size_text(info.st_size)}: over {size_text(_IGNORE_BYTES)}, its rules are "
                           "not applied)")
        return []
    try:
        data = read_file(path, ".gitignore", _IGNORE_BYTES, expect=(info.st_dev, info.st_ino), follow=True)
    except DocumentError as err:
        out.skipped.append(f".gitignore ({str(err).split(';')[0].removeprefix('.gitignore').strip()})")
        return []
    return data.decode("utf-8", "replace").splitlines()


def _rules(root: Path, include, exclude, lines):
    """excluded(rel, name, is_folder): hidden names, the top .gitignore, --include and --exclude."""
    ignored = _spec(lines)
    wanted, unwanted = _spec(list(include)), _spec(list(exclude))

    def excluded(rel: str, name: str, is_folder: bool) -> bool:
        if is_folder:
            return name.startswith(".") or bool(ignored and ignored.match_file(rel + "/")) or \
                bool(unwanted and unwanted.match_file(rel + "/"))
        return bool((wanted and not wanted.match_file(rel)) or (unwanted and unwanted.match_file(rel)) or
                    (name.startswith(".") and not (wanted and wanted.match_file(rel))) or
                    (ignored and ignored.match_file(rel)))

    return excluded


def folder_files(root: Path, include=(), exclude=(), follow_symlinks: bool = False) -> Listing:
    """What a folder holds to read, and what it holds that is left out; patterns are gitignore-style."""
    real_root = os.path.realpath(root)
    out = Listing()
    excluded = _rules(root, include, exclude, _ignore_lines(root, real_root, follow_symlinks, out))
    seen = {(os.stat(real_root).st_dev, os.stat(real_root).st_ino)}
    stack = [(str(root), "")]
    while stack:
        folder, base = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as err:
            out.skipped.append(f"{base or '.'}/ (cannot be read: {err.strerror})")
            continue
        below = []
        for entry in entries:
            rel = f"{base}{entry.name}"
            link = entry.is_symlink()
            if link and excluded(rel, entry.name, True) and excluded(rel, entry.name, False):
                continue  # left out by name whatever it points to: not even resolved
            try:
                info = _target(entry.path, rel, real_root, follow_symlinks, out) if link else \
                    entry.stat(follow_symlinks=False)
            except OSError as err:
                out.skipped.append(f"{rel} (cannot be read: {err.strerror})")
                continue
            if info is None:
                continue
            if stat.S_ISDIR(info.st_mode):
                if excluded(rel, entry.name, True):
                    continue
                if link and not follow_symlinks:
                    out.skipped.append(f"{rel}/ (a link to a folder inside this one: its files are read there)")
                elif (info.st_dev, info.st_ino) in seen:
                    out.skipped.append(f"{rel}/ (a folder already read, through a link)")
                else:
                    seen.add((info.st_dev, info.st_ino))
                    below.append((entry.path, rel + "/"))
                continue
            if excluded(rel, entry.name, False):
                continue
            if not stat.S_ISREG(info.st_mode):
                out.not_regular.append(f"{rel} ({kind_of(info.st_mode)})")
                continue
            out.files.append((rel, entry.path, (info.st_dev, info.st_ino), info.st_size, link))
        stack.extend(reversed(below))
    out.files.sort(key=lambda f: f[0].split("/"))
    return out


def folder_text(root: Path, where: str, read_one, include=(), exclude=(), follow_symlinks: bool = False,
                limit: int = MAX_DOCUMENT_BYTES):
    """(text, files read, files left out, entries that are not regular files); read_one(data, where, suffix)
    reads each file's bytes by its content. A file over `limit` is left out; the folder over it is refused."""
    found = folder_files(root, include, exclude, follow_symlinks)
    skipped = found.skipped
    parts, read, total = [], [], 0
    for rel, path, identity, size, link in found.files:
        if size > limit:
            skipped.append(f"{rel} ({size_text(size)}, over {FLAG} ({size_text(limit)}))")
            continue
        if total + size > limit:
            raise DocumentError(f"folder {where} holds more than {FLAG} ({size_text(limit)}) of documents in all "
                                f"(reached at {rel}); name fewer files with --include/--exclude, or raise the limit")
        try:
            data = read_file(path, f"{where}/{rel}", limit - total, expect=identity, follow=link)
            total += len(data)
            text = read_one(data, f"{where}/{rel}", Path(rel).suffix)
        except DocumentError as err:
            why = str(err).split(";")[0].removeprefix(f"{where}/{rel}").strip(" :")
            skipped.append(f"{rel} ({why})")
            continue
        parts.append(f"{FILE_MARK.format(rel)}\n{text.strip()}")
        read.append(rel)
    if not parts:
        left = skipped + found.not_regular
        what = f"; left out: {', '.join(left[:3])}{' ...' if len(left) > 3 else ''}" if left else ""
        raise DocumentError(f"folder {where} has no readable documents{what}; check --include/--exclude "
                            "and its .gitignore")
    return "\n\n".join(parts), tuple(read), tuple(skipped), tuple(found.not_regular)
