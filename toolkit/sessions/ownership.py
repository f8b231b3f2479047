"""Which folders the toolkit may delete or replace: only one it can prove it wrote.

A folder the toolkit writes holds MARKER, a small JSON file with the folder's format name and
a random id; a document cache's manifest records the same id. A folder is the toolkit's when
its marker names the expected format and (for a cache) its manifest the same id, and it holds
nothing but the files the toolkit put there. Anything else (another program's folder that
happens to hold a manifest.json, a cache someone added notes to, a symlink) is refused in one
line and left as it is. Temporary folders are made fresh (mkdtemp) next to the target, so
removing one never touches a name someone else chose."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

MARKER = "lctk-marker.json"
_MARKER_BYTES = 4096  # a marker is a few dozen bytes; a big file by that name is not ours
_ID = re.compile(r"[0-9a-f]{32}")


def new_id() -> str:
    return secrets.token_hex(16)


def write_marker(folder: Path, fmt: str, marker_id: str) -> None:
    with open(folder / MARKER, "x", encoding="utf-8") as handle:  # "x": never over a file that is there
        handle.write(json.dumps({"format": fmt, "id": marker_id}))
        handle.flush()
        os.fsync(handle.fileno())


def read_marker(folder: Path, fmt: str) -> str | None:
    """The id of `folder`'s marker when it is a regular file naming format `fmt`, else None."""
    path = folder / MARKER
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > _MARKER_BYTES:
            return None
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(found, dict) or found.get("format") != fmt:
        return None
    marker_id = found.get("id")
    return marker_id if isinstance(marker_id, str) and _ID.fullmatch(marker_id) else None


def _manifest(folder: Path, name: str):
    path = folder / name
    try:
        if path.is_symlink() or not path.is_file():
            return None
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def not_ours(folder: Path, fmt: str, manifest_name: str, fixed: tuple[str, ...]) -> str | None:
    """Why a non-empty document-cache folder cannot be proven the toolkit's, or None when it can:
    a marker of format `fmt` whose id the manifest records, and only files the toolkit wrote
    (the marker, the manifest, `fixed` and the files the manifest lists), none a symlink."""
    marker_id = read_marker(folder, fmt)
    if marker_id is None:
        return f"it has no {MARKER} of lctk's (saved by another program, or by an lctk before markers)"
    manifest = _manifest(folder, manifest_name)
    if manifest is None or manifest.get("marker") != marker_id:
        return f"its {manifest_name} does not record the id of its {MARKER}"
    ranks = manifest.get("ranks")
    listed = {r.get("file") for r in ranks if isinstance(r, dict)} if isinstance(ranks, list) else set()
    allowed = {MARKER, manifest_name, *fixed} | {f for f in listed if isinstance(f, str)}
    foreign = sorted(p.name for p in folder.iterdir()
                     if p.name not in allowed or p.is_symlink() or not p.is_file())
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"it holds files lctk did not write there ({shown})"
    return None


def check_replaceable(path, fmt: str, manifest_name: str, fixed: tuple[str, ...], what: str,
                      error: type[Exception] = ValueError) -> Path:
    """Where a folder of format `fmt` may be written: a new directory, an empty one, or one the
    toolkit can prove it wrote (then replaced). Checked before any work; a refusal leaves it untouched."""
    target = Path(path).absolute()
    if not target.parent.is_dir():
        raise error(f"cannot save the {what} to {path}: folder {target.parent} does not exist")
    if target.is_symlink():
        raise error(f"{path} is a symbolic link; give the directory it points to (a {what} is replaced "
                         "whole, and lctk replaces only a directory it wrote)")
    if not target.exists():
        return target
    if not target.is_dir():
        raise error(f"{path} exists and is not a directory; give a new directory for the {what}")
    if any(target.iterdir()):
        why = not_ours(target, fmt, manifest_name, fixed)
        if why:
            raise error(f"{path} is not a saved {what} lctk can replace: {why}; it is left as it is: "
                             "give a new or empty directory")
    return target


def fresh_sibling(target: Path, tag: str) -> Path:
    """A new, empty, uniquely named hidden folder next to `target` (so it can be renamed into place)."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}-", dir=target.parent))


def swap_in(partial: Path, target: Path, still_ours) -> None:
    """Put the finished folder `partial` at `target`: an empty target is replaced, one the toolkit
    wrote is moved aside and removed once `partial` is in place. `still_ours(target)` is asked
    again just before (the folder may have changed since the first check) and raises if not."""
    if target.is_symlink():
        raise FileExistsError(f"{target} became a symbolic link; lctk replaces only a directory it wrote")
    if target.exists() and any(target.iterdir()):
        still_ours(target)
        old = fresh_sibling(target, "old")
        os.rename(target, old)  # onto the empty folder just made: atomic
        try:
            os.rename(partial, target)
        except OSError:
            os.rename(old, target)  # the old cache goes back where it was
            raise
        shutil.rmtree(old, ignore_errors=True)  # the proven cache, now under a name we made
    else:
        os.rename(partial, target)  # a missing or empty target: nothing of anyone's is lost
