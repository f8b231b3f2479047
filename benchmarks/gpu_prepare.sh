#!/usr/bin/env bash
# Prepare, on a machine that reaches PyPI, the wheels the GPU check carries to a GPU machine
# that has no network: into .whl/ (ignored by git), at most 64 MiB with the working tree.
#
#   bash benchmarks/gpu_prepare.sh       # here; then, there: bash benchmarks/gpu_check.sh
#
# The GPU image has CUDA PyTorch, transformers (another version than our pin), accelerate,
# tokenizers, safetensors, huggingface-hub, click, rich, tqdm, pyyaml, psutil, matplotlib,
# lxml, pathspec, prometheus-client, einops, msgpack, ninja, py-cpuinfo, typer; it lacks
# DeepSpeed, flash-attn and the rest of our runtime requirements. What is carried, at the
# versions this checkout's venv runs (constraints.txt):
# - DeepSpeed built without ops (DS_BUILD_OPS=0): a py3-none-any wheel; AutoTP needs no op;
# - transformers at our pin (pure Python; its tokenizers / huggingface-hub / safetensors
#   requirements are met by the image), and regex, which its import-time version check reads;
# - pydantic (+ pydantic-core, compiled: the cp312 manylinux x86_64 wheel), hjson: DeepSpeed's;
# - gguf, pypdf, python-docx, ebooklib, fastapi, starlette,
#   uvicorn, opentelemetry-api (fastapi imports it), typing-extensions (pydantic's minimum).
# flash-attn is not carried: its wheel is hundreds of MiB. The check says so in a row.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
LIMIT_MIB="${LCTK_CARRY_LIMIT_MIB:-64}"
OUT=.whl
TMP="$OUT.tmp"
fail() { echo "gpu_prepare: $*" >&2; exit 1; }

[ -x "$PY" ] || command -v "$PY" >/dev/null || fail "no Python at $PY: run 'make test' once (it builds .venv), or set PY"
version() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null \
  || fail "$1 is not installed in $PY: run 'make test' once, or set PY to the venv that runs the suite"; }

PURE=(transformers hjson pydantic annotated-types typing-inspection typing-extensions gguf pypdf
      python-docx ebooklib fastapi starlette uvicorn opentelemetry-api)
COMPILED=(pydantic-core regex xxhash)
specs=()
for name in "${PURE[@]}" "${COMPILED[@]}"; do specs+=("$name==$(version "$name")"); done
ds="deepspeed==$(version deepspeed)"

rm -rf "$TMP"
mkdir -p "$TMP"
echo "gpu_prepare: building $ds without ops" >&2
LOG="$TMP/pip.log"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-cache-dir --no-binary deepspeed "$ds" -w "$TMP" >"$LOG" 2>&1 \
  || { cat "$LOG" >&2; fail "building the $ds wheel failed (pip's output above)"; }
echo "gpu_prepare: downloading ${#specs[@]} wheels for CPython 3.12 on x86_64 Linux" >&2
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 -d "$TMP" "${specs[@]}" >"$LOG" 2>&1 \
  || { cat "$LOG" >&2; fail "downloading the wheels failed (pip's output above)"; }
rm -f "$LOG"

# one wheel per project (two versions of one stop the install there), the DeepSpeed one pure
"$PY" - "$TMP" <<'EOF' || exit 1
import sys
from collections import Counter
from pathlib import Path

wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
names = Counter(w.name.split("-")[0].lower().replace("_", "-") for w in wheels)
twice = [n for n, k in names.items() if k > 1]
ds = [w.name for w in wheels if w.name.startswith("deepspeed-")]
if twice:
    sys.exit(f"gpu_prepare: two wheels of {', '.join(twice)} in {sys.argv[1]}: keep one version")
if len(ds) != 1 or not ds[0].endswith("-py3-none-any.whl"):
    sys.exit(f"gpu_prepare: expected one pure DeepSpeed wheel, found {ds}")
EOF

wheels_bytes=$(du -cb "$TMP"/*.whl | tail -1 | cut -f1)
tree_bytes=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null || true) \
  | awk '$2 == "total" {s += $1} END {print s + 0}')
total=$((wheels_bytes + tree_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
for w in "$TMP"/*.whl; do printf '%6s MiB  %s\n' "$(mib "$(stat -c %s "$w")")" "$(basename "$w")"; done
echo "wheels $(mib "$wheels_bytes") MiB + working tree $(mib "$tree_bytes") MiB = $(mib "$total") MiB (limit $LIMIT_MIB MiB)"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  rm -rf "$TMP"
  fail "the wheels and the working tree come to $((total / 1048576)) MiB, over the ${LIMIT_MIB} MiB that travels: nothing written"
fi
rm -rf "$OUT"
mv "$TMP" "$OUT"
echo "gpu_prepare: wrote $OUT/; on the GPU machine run: bash benchmarks/gpu_check.sh (with $OUT carried)" >&2
