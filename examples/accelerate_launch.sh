#!/usr/bin/env bash
# The Python API (examples/python_api.py) under `accelerate launch`: accelerate creates the
# process group and the toolkit uses it (rank and device come from it).
#
#   examples/accelerate_launch.sh [NUM_PROCESSES [MODEL]]      # default: 2, the demo model
#
# GPU machines: `accelerate launch --num_processes N` starts one process per GPU (NCCL).
# CPU-only machines: `accelerate launch --cpu --num_processes 2` starts a single process
# (accelerate's multi-CPU mode needs MPI), so here the same script is started by torchrun,
# and `PartialState(cpu=True)` inside it builds the gloo group that the toolkit reuses.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
N="${1:-2}"
shift || true
BIN="${BIN:-$REPO/.venv/bin}"
[ -x "$BIN/torchrun" ] || BIN="$(dirname "$(command -v torchrun)")"
cd "$REPO"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    exec "$BIN/accelerate" launch --num_processes "$N" examples/python_api.py "$@"
else
    exec "$BIN/torchrun" --standalone --nproc_per_node "$N" examples/python_api.py "$@"
fi
