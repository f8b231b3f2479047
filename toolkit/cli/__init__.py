"""`lctk`: summarise long documents and generate text with a Hugging Face causal LM, its
prompt split over every rank the launcher started (deepspeed, torchrun, accelerate or none).

Every rank runs the same command; rank 0 alone prints. Cheap checks (files, flags, preset,
model config, layout) run before any weight is loaded. One module per command.
"""
from __future__ import annotations

import click

from .. import __version__
from .ask import ask
from .bench import bench_command
from .generate import generate
from .info import info
from .plan import plan_command
from .presets import presets_command
from .serve import serve
from .summarize import summarize
from .support import LctkGroup, debug_option

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=LctkGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="lctk")
@debug_option
def cli(debug):
    """Exact long-context inference: summarise or continue a prompt too long for one device.

    \b
    lctk summarize report.md                      # one process, the demo model
    lctk ask contract.pdf -q "Who signed?" --cache contract.kv
    torchrun --nproc_per_node 2 launch/run.py serve --port 8000   # the OpenAI API
    deepspeed --num_gpus 8 launch/run.py summarize report.md --model PATH
    torchrun --nproc_per_node 4 launch/run.py generate --prompt-file p.txt --json
    """


for command, name in ((summarize, "summarize"), (ask, "ask"), (generate, "generate"), (info, "info"), (plan_command, "plan"),
                      (presets_command, "presets"), (serve, "serve"), (bench_command, "bench")):
    cli.add_command(command, name)


def main(argv=None):
    """Console script `lctk`; launch/run.py calls it under deepspeed and torchrun."""
    cli.main(args=argv, prog_name="lctk")


__all__ = ["cli", "main"]
