"""Named layouts in configs/presets/*.yaml: read and check against the schema.

A preset is a short YAML file: a description plus a few of the keys below. Degrees
may be "auto", which the planner fills at run time from the real world size and
prompt length (toolkit.config.make_run_config); options given on the command line win.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml

from ..attention.kv_formats import KV_DTYPES
from .paths import config_dir, named_configs

__all__ = ["Preset", "PresetError", "check_value", "config_dir", "list_presets", "load_preset",
           "merged_settings", "preset_path"]

DEGREES = ("tp", "ulysses", "ring", "pp")
CHOICES = {
    "ring_mode": ("pass-kv", "pass-q", "auto"),
    "sequence_layout": ("zigzag", "contiguous"),
    "dtype": ("float32", "bfloat16", "float16", "auto"),
    "workload": ("prefill", "decode", "auto"),
    "kv_dtype": KV_DTYPES,
}
KNOWN_KEYS = ("description",) + DEGREES + ("chunk_size",) + tuple(CHOICES)


class PresetError(ValueError):
    """A preset that cannot be read or breaks the schema; names file, line and key."""


@dataclass(frozen=True)
class Preset:
    """One preset file, validated. Degrees are an int or "auto"."""

    name: str
    description: str
    path: str
    tp: Union[int, str] = "auto"
    ulysses: Union[int, str] = "auto"
    ring: Union[int, str] = "auto"
    pp: Union[int, str] = "auto"
    chunk_size: Optional[int] = None
    ring_mode: str = "auto"
    sequence_layout: str = "zigzag"
    dtype: str = "auto"
    workload: str = "auto"
    kv_dtype: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_value(key: str, value: Any) -> Optional[str]:
    """Why ``value`` is not allowed for ``key`` (None when it is)."""
    if key in DEGREES:
        if value == "auto" or _is_positive_int(value):
            return None
        return f"key {key!r}: {value!r} is not allowed; allowed values: a positive integer or auto"
    if key == "chunk_size":
        if _is_positive_int(value):
            return None
        return f"key 'chunk_size': {value!r} is not allowed; allowed values: a positive integer"
    if key == "description":
        if isinstance(value, str) and value.strip():
            return None
        return "key 'description': must be a non-empty one-line string"
    if key in CHOICES:
        if value in CHOICES[key]:
            return None
        return (f"key {key!r}: {value!r} is not allowed; allowed values: "
                f"{', '.join(CHOICES[key])}")
    return f"unknown key {key!r}; known keys: {', '.join(KNOWN_KEYS)}"


def _key_lines(text: str) -> dict[str, int]:
    """1-based line of each top-level key, from the YAML node tree (safe loader)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in node.value}


def preset_from_text(text: str, path: Union[str, Path]) -> Preset:
    """Parse and validate one preset's YAML text; errors name the file and line."""
    path = Path(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise PresetError(f"{path}{where}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise PresetError(f"{path}: a preset must be a mapping of keys "
                          f"({', '.join(KNOWN_KEYS)})")
    lines = _key_lines(text)
    for key, value in data.items():
        problem = check_value(str(key), value)
        if problem:
            line = f", line {lines[str(key)]}" if str(key) in lines else ""
            raise PresetError(f"{path}{line}: {problem}")
    if "description" not in data:
        raise PresetError(f"{path}: missing key 'description' (a one-line summary)")
    return Preset(name=path.stem, path=str(path), **data)


def preset_path(name_or_path: Union[str, Path]) -> Path:
    """The file of a preset given by name (configs/presets) or by path."""
    known = named_configs("presets")
    text = str(name_or_path)
    if text in known:
        return known[text]
    path = Path(text).expanduser()
    if path.is_file():
        return path
    raise PresetError(f"unknown preset {text!r}; known presets: {', '.join(known)} "
                      "(or give the path of a .yaml file)")


def load_preset(name_or_path: Union[str, Path, Preset]) -> Preset:
    """Load a preset by name or path; raises PresetError naming file, line and key."""
    if isinstance(name_or_path, Preset):
        return name_or_path
    path = preset_path(name_or_path)
    return preset_from_text(path.read_text(encoding="utf-8"), path)


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every preset in configs/presets."""
    return [(name, load_preset(path).description)
            for name, path in named_configs("presets").items()]


def merged_settings(preset: Union[str, Path, Preset], overrides: Optional[Mapping[str, Any]] = None) -> dict:
    """The preset's settings with the overrides that are not None on top, each checked."""
    settings = load_preset(preset).to_dict()
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        problem = check_value(key, value)
        if problem or key == "description":
            raise PresetError(f"override {problem or 'description cannot be overridden'}")
        settings[key] = value
    return settings
