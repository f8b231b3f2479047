"""Finished map-reduce sections on disk, so a crashed summarisation resumes where it was.

A section's summary is keyed by everything that decides it: the model's config, the
exact prompt tokens and the decoding settings. Rank 0 reads and writes (atomically); the
other ranks get its answer by broadcast, so every rank skips or runs the same sections.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("LCTK_CACHE", Path.home() / ".cache" / "lctk")) / "sections"


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
        if self.resume and _is_rank0():
            path = self.folder / f"{key}.json"
            if path.is_file():
                found = json.loads(path.read_text(encoding="utf-8"))["summary"]
        found = _share_from_rank0(found)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def store(self, key: str, summary: str) -> None:
        if not _is_rank0():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=self.folder)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"summary": summary}, handle)
        os.replace(tmp, self.folder / f"{key}.json")


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _share_from_rank0(value):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
