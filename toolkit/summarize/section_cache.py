"""Finished map-reduce sections on disk, so a crashed summarisation resumes where it was.

A section's summary is keyed by everything that decides it: the model's config, the
exact prompt tokens and the decoding settings. Rank 0 reads and writes (atomically); the
other ranks get its answer by broadcast, so every rank skips or runs the same sections.

The folder is the toolkit's own (sessions/ownership.py): it writes into a new or empty
folder, or one holding its marker (or, written before markers, only section files), and
claims it with a marker on the first write; any other folder is refused before work starts,
and a section file that is damaged or a symlink is a miss, never read through.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ..distributed.comm import broadcast_object, world_group
from ..distributed.launcher import is_main
from ..settings import cache_root
from ..documents import write_atomic
from ..sessions.ownership import MARKER, new_id, read_marker, write_marker
from ..sessions.verify import inside

FORMAT = "lctk-section-cache"
_SECTION = re.compile(r"[0-9a-f]{32}\.json")
_LEFTOVER = re.compile(r"\.[0-9a-f]{32}\.json\..*\.tmp")  # write_atomic's temp file, from a crash
_MAX_SECTION = 1 << 20  # a section summary is a few hundred tokens


def default_cache_dir() -> Path:
    return cache_root() / "sections"


def section_folder_problem(folder) -> str | None:
    """Why finished sections may not be kept in `folder`, or None: it must be new, empty, marked
    as the toolkit's section cache, or hold only section files (a cache from before markers)."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        return f"{folder} is a symbolic link to nothing; give a directory for finished sections (--cache-dir)"
    if not folder.exists():
        return None
    if not folder.is_dir():
        return f"{folder} is not a directory; give a directory for finished sections (--cache-dir)"
    if read_marker(folder, FORMAT) is not None:
        return None
    foreign = sorted(p.name for p in folder.iterdir()
                     if not (_SECTION.fullmatch(p.name) or _LEFTOVER.fullmatch(p.name)) or p.is_symlink())
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return (f"{folder} is not a section cache lctk wrote (no {MARKER}; it holds {shown}); it is left as it is: "
                "give a new or empty directory with --cache-dir")
    return None


class SectionCache:
    def __init__(self, folder, resume: bool, model_fingerprint: str, settings: dict):
        self.folder, self.resume = Path(folder), resume
        self.salt = json.dumps({"model": model_fingerprint, **settings}, sort_keys=True)
        self.hits = self.misses = 0
        problem = section_folder_problem(self.folder) if is_main() else None
        problem = broadcast_object(problem, world_group())  # rank 0 decides for all: every rank refuses
        if problem:
            raise ValueError(problem)

    def key(self, prompt_ids) -> str:
        digest = hashlib.sha256(self.salt.encode())
        digest.update(json.dumps([int(t) for t in prompt_ids]).encode())
        return digest.hexdigest()[:32]

    def _read(self, key: str) -> str | None:
        path = inside(self.folder, f"{key}.json")
        try:
            if path is None or path.stat().st_size > _MAX_SECTION:
                return None
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None  # damaged: a miss, recomputed and rewritten
        summary = found.get("summary") if isinstance(found, dict) else None
        return summary if isinstance(summary, str) else None

    def lookup(self, key: str) -> str | None:
        """The stored summary when resuming (same answer on every rank), else None."""
        found = self._read(key) if self.resume and is_main() else None
        found = broadcast_object(found, world_group())  # rank 0's answer on every rank
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def store(self, key: str, summary: str) -> None:
        if not is_main():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if read_marker(self.folder, FORMAT) is None:
            if section_folder_problem(self.folder):  # it changed since the start: keep nothing, touch nothing
                return
            try:
                write_marker(self.folder, FORMAT, new_id())
            except FileExistsError:  # written beside us, or a marker of another kind
                if read_marker(self.folder, FORMAT) is None:
                    return
        write_atomic(self.folder / f"{key}.json", json.dumps({"summary": summary}))
