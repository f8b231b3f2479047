#!/usr/bin/env bash
# Summarise a document on 2 ranks with the DeepSpeed launcher: 2 GPUs, or 2 CPU processes
# over gloo on a machine without GPUs. Arguments after the document go to `lctk summarize`
# (a later --max-new-tokens wins over the one below).
#
#   examples/summarize_deepspeed.sh                      # the demo document and model
#   examples/summarize_deepspeed.sh report.md --model /models/Qwen2.5-7B-Instruct --json
#
# The demo model (SmolLM2-135M, `make demo` installs it) shows the mechanics; real summaries
# want a real long-context model.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DOC="${1:-$REPO/.venv/demo_document.md}"
shift || true
BIN="${BIN:-$REPO/.venv/bin}"
[ -x "$BIN/deepspeed" ] || BIN="$(dirname "$(command -v deepspeed)")"
if [ ! -f "$DOC" ] && [ "$DOC" = "$REPO/.venv/demo_document.md" ]; then
    "$BIN/python" "$REPO/examples/make_demo_document.py" > "$DOC"
fi
DOC="$(cd "$(dirname "$DOC")" && pwd)/$(basename "$DOC")"
cd "$REPO"
PATH="$BIN:$PATH" exec "$BIN/deepspeed" --master_port "${MASTER_PORT:-29500}" --num_gpus 2 \
    launch/run.py summarize "$DOC" --max-new-tokens 120 "$@"
