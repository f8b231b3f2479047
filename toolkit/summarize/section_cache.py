"""Finished map-reduce sections on disk, so a crashed summarisation resumes where it was.

A section's summary is keyed by everything that decides it: the model's config, the
exact prompt tokens and the decoding settings. Rank 0 reads and writes (atomically); the
other ranks get its answer by broadcast, so every rank skips or runs the same sections.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..distributed.comm import broadcast_object, world_group
from ..distributed.launcher import is_main
from ..settings import cache_root
from ..documents import write_atomic


def default_cache_dir() -> Path:
    return cache_root() / "sections"


class SectionCache:
    def __init__(self, folder, resume: bool, model_fingerprint: str, settings: dict):
        self.folder, self.resume = Path(folder), resume
        self.salt = json.dumps({"model": model_fingerprint, **settings}, sort_keys=True)
        self.hits = self.misses = 0

    def key(self, prompt_ids) -> str:
        digest = hashlib.sha256(self.salt.encode())
        digest.update(json.dumps([int(t) for t in prompt_ids]).encode())
        return digest.hexdigest()[:32]

    def lookup(self, key: str) -> str | None:
        """The stored summary when resuming (same answer on every rank), else None."""
        found = None
        if self.resume and is_main():
            path = self.folder / f"{key}.json"
            if path.is_file():
                found = json.loads(path.read_text(encoding="utf-8"))["summary"]
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
        write_atomic(self.folder / f"{key}.json", json.dumps({"summary": summary}))
