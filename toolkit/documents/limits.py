"""What a document may cost, checked before the work: its size on disk or on stdin (from stat,
then a read that stops at the limit), and for a ZIP-based format (DOCX, EPUB) what its members
expand to, checked from the archive's records and then by reading each member as a bounded
stream, before any library inflates one whole. Every refusal names the limit and its flag."""
from __future__ import annotations

import io
import os
import stat
import zipfile
import zlib

from .base import DocumentError

MIB = 1 << 20
MAX_DOCUMENT_BYTES = 512 * MIB   # per file, per folder (its running total), per archive expanded
FLAG = "--max-document-bytes"
ZIP_RATIO = 100                  # a member over its grace may expand at most this many times ...
ZIP_RATIO_GRACE = 32             # ... the grace being 1/32 of the limit (16 MiB at the default)
ZIP_MEMBER_BYTES = 4096          # an archive may list one member per 4 KiB of the limit (131,072) ...
ZIP_MEMBERS = 1000               # ... and never fewer than this many
_CHUNK = MIB


def size_text(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


def over_limit(where: str, what: str, limit: int) -> DocumentError:
    return DocumentError(f"{where} {what}, over {FLAG} ({size_text(limit)}); raise it (a number of bytes) "
                         "if the document is genuine")


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return what
    return "not a regular file"


def read_stream(stream, where: str, limit: int, hint: int = 0) -> bytes:
    """At most `limit` bytes of a stream, refused if there are more; never a read past limit + 1."""
    parts, total = [], 0
    while total <= limit:
        want = min(limit + 1 - total, max(hint + 1 - total, _CHUNK))
        chunk = stream.read(want)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        total += len(chunk)
    raise over_limit(where, f"is more than {size_text(limit)}", limit)


def read_file(path, where: str, limit: int, expect: tuple | None = None, follow: bool = True) -> bytes:
    """A regular file's bytes. Opened without blocking (a FIFO that slipped in does not hang us),
    checked on the open descriptor (regular, the file that was vetted, its size) before a byte is read."""
    try:
        mode = (os.stat if follow else os.lstat)(path).st_mode
    except OSError as err:
        raise DocumentError(f"{where} cannot be read ({err.strerror}); check its permissions") from None
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):  # a device is not even opened (a link: O_NOFOLLOW fails)
        raise DocumentError(f"{where} is {kind_of(mode)}, not a regular file; give a file, a folder, "
                            "or `-` for stdin")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise DocumentError(f"{where} cannot be read ({err.strerror}); check its permissions") from None
    with os.fdopen(fd, "rb", buffering=0) as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DocumentError(f"{where} is {kind_of(info.st_mode)}, not a regular file; give a file, a folder, "
                                "or `-` for stdin")
        if expect is not None and (info.st_dev, info.st_ino) != expect:
            raise DocumentError(f"{where} changed while the folder was read; read it again")
        if info.st_size > limit:
            raise over_limit(where, f"is {size_text(info.st_size)}", limit)
        try:
            return read_stream(handle, where, limit, info.st_size)
        except OSError as err:
            raise DocumentError(f"{where} cannot be read ({err.strerror}); check the file") from None


def _listed_members(data: bytes) -> int | None:
    """The member count the archive's end record declares, read before ZipFile builds an entry per
    member (the standard library has no public reader of it; None where it is missing)."""
    end_record = getattr(zipfile, "_EndRecData", None)
    try:
        record = end_record(io.BytesIO(data)) if end_record else None
        return record[zipfile._ECD_ENTRIES_TOTAL] if record else None
    except (OSError, IndexError, AttributeError, zipfile.BadZipFile):
        return None


def _damaged(where: str, detail: str) -> DocumentError:
    return DocumentError(f"{where} starts like a ZIP file (DOCX, EPUB) but is damaged or crafted ({detail}); "
                         "save it again from the program that made it")


def open_zip(data: bytes, where: str, limit: int) -> zipfile.ZipFile:
    """The archive, once its members are known to fit: their count, their total expanded size and
    each one's ratio from the records, then each member read as a stream that stops at its
    declared size (a record that lies fails its CRC there, before a reader trusts it)."""
    listed = _listed_members(data)
    allowed = max(ZIP_MEMBERS, limit // ZIP_MEMBER_BYTES)
    if listed is not None and listed > allowed:
        raise over_limit(where, f"lists {listed} members, more than the {allowed} allowed (one per "
                         f"{size_text(ZIP_MEMBER_BYTES)} of the limit)", limit)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise _damaged(where, str(err) or type(err).__name__) from None
    try:
        _check_members(archive, where, limit)
    except BaseException:
        archive.close()
        raise
    return archive


def _check_members(archive: zipfile.ZipFile, where: str, limit: int) -> None:
    members = archive.infolist()
    total = sum(m.file_size for m in members)
    if total > limit:
        largest = max(members, key=lambda m: m.file_size)
        raise over_limit(where, f"would expand to {size_text(total)} when unzipped ({largest.filename}: "
                         f"{size_text(largest.file_size)})", limit)
    grace = limit // ZIP_RATIO_GRACE
    for m in members:
        if m.file_size > grace and m.file_size > ZIP_RATIO * max(m.compress_size, 1):
            raise over_limit(where, f"has a member that expands {m.file_size // max(m.compress_size, 1)} times "
                             f"({m.filename}: {size_text(m.compress_size)} to {size_text(m.file_size)}), a zip bomb's "
                             f"ratio: over {size_text(grace)} (1/{ZIP_RATIO_GRACE} of the limit) a member may expand "
                             f"at most {ZIP_RATIO} times", limit)
    read = 0
    for m in members:
        try:
            with archive.open(m) as member:
                size = 0
                while chunk := member.read(_CHUNK):
                    size += len(chunk)
                    read += len(chunk)
                    if size > m.file_size or read > limit:  # the standard library stops at the record's size
                        raise over_limit(where, f"expands past what its records say ({m.filename})", limit)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as err:
            raise _damaged(where, f"{m.filename}: {err}") from None
