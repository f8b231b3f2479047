"""Where the YAML configs live, in a checkout and in an installed package."""
from __future__ import annotations

from pathlib import Path

_SUBDIRS = ("models", "hardware", "presets")


def config_dir() -> Path:
    """Return the folder holding models/, hardware/ and presets/.

    In a checkout it is ``<repo>/configs`` (next to ``toolkit/``); an installed
    wheel carries a copy as package data in ``toolkit/_configs``.
    """
    toolkit_dir = Path(__file__).resolve().parents[1]
    candidates = (toolkit_dir.parent / "configs", toolkit_dir / "_configs")
    for candidate in candidates:
        if all((candidate / sub).is_dir() for sub in _SUBDIRS):
            return candidate
    raise FileNotFoundError(
        "cannot find the configs folder: looked for "
        + " and ".join(str(c) for c in candidates)
    )


def named_configs(kind: str) -> dict[str, Path]:
    """Map each config name of a kind ("models", "hardware", "presets") to its file."""
    folder = config_dir() / kind
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}
