"""`lctk info`: versions, backend, devices, this rank and world, optional parts."""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata

import click

from .. import __version__
from ..distributed.launcher import is_main
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
    for name, version in report["versions"].items():
        click.echo(f"{name:<13} {version}")
    click.echo(f"{'backend':<13} {report['backend']}")
    for device in report["devices"]:
        click.echo(f"{'device':<13} {device}")
    click.echo(f"{'world':<13} {report['world']} (rank {report['rank']}, local rank {report['local_rank']}, "
               f"{report['local_world']} per node)")
    for part, present in report["optional"].items():
        click.echo(f"{'optional':<13} {part}: {'yes' if present else 'no'}")
