"""The one place that reads LCTK_* variables. Everything else asks these functions."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Converted models, section summaries and benchmark models: $LCTK_CACHE, else ~/.cache/lctk."""
    return Path(os.environ.get("LCTK_CACHE") or Path.home() / ".cache" / "lctk")


def debug_enabled() -> bool:
    """LCTK_DEBUG=1: full tracebacks and library logs, as --debug gives."""
    return os.environ.get("LCTK_DEBUG") == "1"


def backend_override() -> str | None:
    """LCTK_DIST_BACKEND=gloo lets several ranks share one GPU (NCCL refuses that): tests and checks."""
    return os.environ.get("LCTK_DIST_BACKEND") or None
