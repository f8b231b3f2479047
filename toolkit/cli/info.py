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
from ..options import DTYPE_NAMES
from .plan import _fmt_bytes, make_console, text_table
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


def _shares(model: str, gguf_file, tp: int, pp: int, dtype: str | None) -> dict:
    """The checkpoint's size and what each rank of tp x pp would hold of it (no weight is read)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..loading.checkpoint import Checkpoint
    from ..tensor_parallel.autotp import planned_shares
    from ..models import ModelSource, load_config, resolve_source, weights_folder
    from ..planner.model_dims import load_model_dims
    from ..planner.rules import structural_errors

    folder = weights_folder(resolve_source(model, gguf_file))
    config = load_config(ModelSource(str(folder)))
    errors = structural_errors(load_model_dims(config.to_dict()), tp, 1, 1, pp, tp * pp)
    if errors:
        raise click.BadParameter("; ".join(errors), param_hint="--tp/--pp")
    with Checkpoint(folder) as checkpoint:
        size, files, tensors = checkpoint.nbytes(), len({entry[0] for entry in checkpoint.entries.values()}), \
            len(checkpoint.entries)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    dtype = dtype or "float32"
    element = getattr(torch, dtype).itemsize
    shares = planned_shares(meta, tp, pp)
    return {"folder": str(folder), "checkpoint_bytes": size, "files": files, "tensors": tensors, "tp": tp, "pp": pp,
            "dtype": dtype, "rank_bytes": [[n * element for n in stage] for stage in shares]}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--model", "-m", metavar="NAME|PATH", help="Also show this checkpoint's size and each rank's share.")
@click.option("--gguf-file", metavar="FILE", help="GGUF file inside the --model folder.")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True, help="Layout for --model's shares.")
@click.option("--pp", type=click.IntRange(min=1), default=1, show_default=True, help="Layout for --model's shares.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES),
              help="Dtype the shares are counted in. [default: float32]")
@debug_option
def info(as_json, model, gguf_file, tp, pp, dtype, debug):
    """Versions, distributed backend, devices, this rank and world, optional parts installed;
    with --model, the checkpoint's size and what each rank of a tp x pp layout holds of it."""
    from ..backends import optional_parts

    report = {"versions": _versions(), **_runtime(), "optional": optional_parts()}
    if model:
        report["model"] = _shares(model, gguf_file, tp, pp, dtype)
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
    if model:
        m = report["model"]
        table.add_row(Text("checkpoint"), Text(f"{m['folder']}: {_fmt_bytes(m['checkpoint_bytes'])} in "
                                               f"{m['tensors']} tensors, {m['files']} file(s)"))
        for stage, per_rank in enumerate(m["rank_bytes"]):
            for rank, held in enumerate(per_rank):
                table.add_row(Text("rank share"), Text(
                    f"stage {stage} tp rank {rank}: {_fmt_bytes(held)} ({m['dtype']}), "
                    f"{held / m['checkpoint_bytes']:.2f} of the checkpoint"))
    make_console().print(table)
