#!/usr/bin/env bash
# The prepared GPU check (issue 7, item 4): one H200, under 8 minutes, a short table last.
#
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run  # every step on CPU with small sizes
#
# Measures the bf16 matmul rate and copy bandwidth, checks our attention kernels on CUDA
# against the float64 reference, times world-1 prefill of a random-weight Llama-3.1-8B-
# shaped model at 32K and 128K tokens (ours vs transformers sdpa: tokens/s, MFU, peak
# memory), and runs the multi-rank correctness checks with ranks sharing the one GPU.
# Uses the venv `make test` builds (.venv) and installs nothing else; flash-attn is used
# when that venv has it. Writes benchmarks/out/gpu_check.json; then
# `python benchmarks/run_all.py --render` puts the table into benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# The interpreter: $PY if set; else the make-built .venv; else a system python3 that
# already has CUDA torch, transformers and deepspeed (GPU machines often come that way,
# and the CPU-only .venv would be useless there); else build the venv as `make test` does.
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    PY=.venv/bin/python
  elif python3 -c "import torch, transformers, deepspeed; assert torch.cuda.is_available()" 2>/dev/null; then
    PY=python3
  else
    PY=.venv/bin/python
    [ -x "$PY" ] || { echo "gpu_check: building the venv as 'make test' does" >&2; make -s .venv/.installed; }
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# 8-minute ceiling on the whole run (the script itself plans for 7.5).
exec timeout --signal=INT --kill-after=20 480 "$PY" benchmarks/gpu_check.py --out benchmarks/out "$@"
