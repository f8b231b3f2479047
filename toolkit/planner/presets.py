"""Named layouts in configs/presets/*.yaml: read and check against the schema.

A preset is a partial run config: a short YAML file with a description and any of the run
options declared in toolkit.options, each checked by its declaration. Degrees may be "auto",
which the planner fills at run time from the real world size and prompt length
(toolkit.config.make_run_config); options given on the command line or as keywords win.
"""
from __future__ import annotations

from dataclasses import field, fields, make_dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml

from ..options import RUN_OPTIONS, OptionError, run_defaults
from .paths import config_dir, named_configs

__all__ = ["Preset", "PresetError", "check_value", "config_dir", "list_presets", "load_preset",
           "merged_settings", "preset_path"]

KNOWN_KEYS = ("description",) + tuple(RUN_OPTIONS)


class PresetError(OptionError):
    """A preset that cannot be read or breaks the schema; names file, line and key."""


def _to_dict(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in fields(self)}


# Its fields: name, description, path, then every run option with the option's default.
Preset = make_dataclass("Preset", [("name", str), ("description", str), ("path", str)]
                        + [(name, Any, field(default=option.default)) for name, option in RUN_OPTIONS.items()],
                        frozen=True, namespace={"to_dict": _to_dict, "__module__": __name__,
                                                "__doc__": "One preset file, validated: a partial run config."})


def check_value(key: str, value: Any) -> Optional[str]:
    """Why ``value`` is not allowed for ``key`` (None when it is)."""
    if key == "description":
        if isinstance(value, str) and value.strip():
            return None
        return "key 'description': must be a non-empty one-line string"
    if key not in RUN_OPTIONS:
        return f"unknown key {key!r}; known keys: {', '.join(KNOWN_KEYS)}"
    problem = RUN_OPTIONS[key].problem(value)
    return f"key {key!r}: {problem}" if problem else None


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


def merged_settings(preset: Union[str, Path, Preset, None],
                    overrides: Optional[Mapping[str, Any]] = None) -> dict:
    """The preset's settings (no preset: every run option's default) with the overrides that
    are not None on top, each checked."""
    settings = load_preset(preset).to_dict() if preset is not None else {"name": None, **run_defaults()}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        problem = check_value(key, value)
        if problem or key == "description":
            raise PresetError(f"override {problem or 'description cannot be overridden'}")
        settings[key] = value
    return settings
