#!/usr/bin/env python
"""The `lctk` commands for launchers, runnable from a checkout without installing:

    deepspeed --num_gpus N launch/run.py summarize doc.md      (N CPU ranks on gloo without GPUs)
    torchrun --nproc_per_node N launch/run.py generate --prompt "..." --json
    python launch/run.py info                                  (world size 1)

DeepSpeed's launcher adds `--local_rank=N` to our arguments; it is taken out here (its value
goes to LOCAL_RANK when the launcher did not set it) so the CLI sees only its own options.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def strip_local_rank(argv: list[str]) -> tuple[list[str], str | None]:
    """Remove the first `--local_rank=N` / `--local_rank N` (or --local-rank) -> (rest, N or None)."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name not in ("--local_rank", "--local-rank"):
            continue
        if eq:
            return argv[:i] + argv[i + 1:], value
        if i + 1 < len(argv):
            return argv[:i] + argv[i + 2:], argv[i + 1]
    return list(argv), None


def main() -> None:
    args, local_rank = strip_local_rank(sys.argv[1:])
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", local_rank)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from toolkit.cli import main as lctk_main

    lctk_main(args)


if __name__ == "__main__":
    main()
