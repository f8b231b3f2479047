"""`lctk presets`: the named layouts, or one preset's settings."""
from __future__ import annotations

from typing import Optional

import click

from ..planner.presets import PresetError, list_presets, load_preset


@click.command("presets")
@click.argument("name", required=False)
def presets_command(name: Optional[str]) -> None:
    """List the presets, or show one preset's settings (by name or path)."""
    try:
        if name:
            chosen = load_preset(name)
            for key, value in chosen.to_dict().items():
                if key != "path":
                    click.echo(f"{key}: {value}")
            return
        entries = list_presets()
    except PresetError as err:
        raise click.ClickException(str(err)) from None
    width = max(len(entry[0]) for entry in entries)
    for preset_name, description in entries:
        click.echo(f"{preset_name.ljust(width)}  {description}")
