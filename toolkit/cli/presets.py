"""`lctk presets`: the named layouts, or one preset's settings."""
from __future__ import annotations

from typing import Optional

import click
from rich.text import Text

from ..planner.presets import PresetError, list_presets, load_preset
from .plan import make_console, text_table


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
    table = text_table()
    table.add_column("name", no_wrap=True)
    table.add_column("description", overflow="fold")
    for preset_name, description in entries:
        table.add_row(Text(preset_name), Text(description))
    make_console().print(table)
