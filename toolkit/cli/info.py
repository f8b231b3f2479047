"""`lctk info`: versions, backend, devices, this rank and world, optional parts."""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata

import click
from rich.text import Text

from .. import __version__
from ..distributed.launcher import is_main
from .plan import make_console, text_table
from .support import debug_option


def _versions() -> dict:
    found = {"python": platform.python_version(), "lctk": __version__}
    for package in ("torch", "transformers", "deepspeed", "accelerate", "click", "gguf"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _runtime() -> dict:
    import torch
    import torch.distributed as dist

    from ..distributed.launcher import launcher_env

    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
    elif not dist.is_available():
        backend = "none"
    else:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if torch.cuda.is_available():
        devices = [f"cuda:{i} {torch.cuda.get_device_name(i)} "
                   f"({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
                   for i in range(torch.cuda.device_count())]
    else:
        devices = [f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"]
    return {"backend": backend, "devices": devices, **launcher_env()}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@debug_option
def info(as_json, debug):
    """Versions, distributed backend, devices, this rank and world, optional parts installed."""
    from ..backends import optional_parts

    report = {"versions": _versions(), **_runtime(), "optional": optional_parts()}
    if not is_main():
        return
    if as_json:
        click.echo(json.dumps(report))
        return
    rows = list(report["versions"].items())
    rows.append(("backend", report["backend"]))
    rows.extend(("device", device) for device in report["devices"])
    rows.append(("world", f"{report['world']} (rank {report['rank']}, local rank "
                          f"{report['local_rank']}, {report['local_world']} per node)"))
    rows.extend(("optional", f"{part}: {'yes' if present else 'no'}")
                for part, present in report["optional"].items())
    table = text_table()
    table.add_column("what", no_wrap=True)
    table.add_column("value", overflow="fold")
    for what, value in rows:
        table.add_row(Text(what), Text(str(value)))
    make_console().print(table)
