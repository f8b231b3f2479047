#!/usr/bin/env bash
# The GPU check (issue 31): one CUDA device, under 8 minutes, one table last; exit 1 if a row fails.
#
#   bash benchmarks/gpu_prepare.sh          # first, on a machine with network: wheels into .whl/
#   bash benchmarks/gpu_check.sh            # then on the GPU machine, with .whl/ carried along
#   bash benchmarks/gpu_check.sh --list     # the steps, what each shows, and their time caps
#   bash benchmarks/gpu_check.sh --dry-run  # every step on CPU with small sizes (slow; checks the script)
#
# Without a CUDA device it refuses in one line (exit 2) unless --dry-run is given. The
# interpreter: $PY if set, else the first of python3 and .venv/bin/python whose torch sees a
# CUDA device. When .whl/ has wheels (DeepSpeed without ops, transformers at our pin, ...;
# see gpu_prepare.sh) they are installed into a fresh folder under $TMPDIR, without network
# or dependencies, and put first on PYTHONPATH with this checkout. Writes
# benchmarks/out/gpu_check.json; `python benchmarks/run_all.py --render` puts its table into
# benchmarks/RESULTS.md. A dry run writes gpu_check-dry.json, which RESULTS.md never shows.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
DRY=0 LIST=0
for arg in "$@"; do
  case "$arg" in --dry-run) DRY=1 ;; --list) LIST=1 ;; esac
done
has_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }
refuse() {
  echo "gpu_check: no CUDA device here ($1); nothing checked: 'bash benchmarks/gpu_check.sh --dry-run' runs the" \
       "steps on CPU, '--list' shows them" >&2
  exit 2
}
if [ -n "${PY:-}" ]; then
  [ "$DRY$LIST" != 00 ] || has_cuda "$PY" || refuse "the torch of PY=$PY sees none"
else
  for candidate in python3 .venv/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 && has_cuda "$candidate"; then PY=$candidate; break; fi
  done
fi
if [ -z "${PY:-}" ]; then
  if [ "$LIST" = 1 ]; then
    PY=python3
  elif [ "$DRY" = 1 ]; then
    PY=.venv/bin/python
    [ -x "$PY" ] || { echo "gpu_check: building the venv as 'make test' does" >&2; make -s .venv/.installed >&2; }
  else
    refuse "no python3 or .venv/bin/python whose torch sees one"
  fi
fi
if [ "$LIST" = 1 ]; then exec "$PY" benchmarks/gpu_check.py "$@"; fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  SITE="${TMPDIR:-/tmp}/lctk-gpu-site"
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-warn-script-location \
    --target "$SITE" .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels from .whl/ failed (see above)" >&2; exit 2; }
  export PYTHONPATH="$SITE:$PYTHONPATH"
  echo "gpu_check: carried wheels installed in $(( $(date +%s) - START )) s: $(ls .whl | tr '\n' ' ')" >&2
elif [ "$DRY" = 0 ]; then
  echo "gpu_check: no .whl/ here: using the image's packages (run benchmarks/gpu_prepare.sh where pip reaches PyPI)" >&2
fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
# the driver keeps to its budget from START (gpu_check.py BUDGET_S: 460 s, 2400 s dry) and writes
# its JSON; the backstop below ends it if it cannot, inside the 8 minutes
if [ "$DRY" = 1 ]; then BACKSTOP_S=2500; else BACKSTOP_S=475; fi
LEFT=$((BACKSTOP_S - ($(date +%s) - START)))
[ "$LEFT" -gt 10 ] || LEFT=10
exec timeout --signal=INT --kill-after=4 "$LEFT" "$PY" benchmarks/gpu_check.py --started "$START" "$@"
