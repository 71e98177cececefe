#!/usr/bin/env bash
# The CUDA path, checked (docs/gpu.md): on a GPU machine without a network, install the bundle that
# `make gpu-bundle` made into a target folder, then, within a time budget, run the suite's `gpu` tests
# and time `local`, `lru-prefetch` and `bagpipe` on configs/bench-gpu.toml. Writes into OUT:
#   gpu-check.log   every command and its output
#   gpu-check.json  the summary: environment, bundle, each test's outcome, samples/s and the trainer's timers
#   junit-gpu.xml, bench-report.md, bench-synced-report.md
#
#   scripts/gpu-check.sh [--out DIR] [--work DIR] [--bundle DIR] [--python PY] [--budget-s S] [--dry-run]
#
# --dry-run: the CPU self-test, here, in the project's own environment (.venv): checks that the bundle
# holds a wheel for every import a job makes, unpacks it for the image's tags, runs the bundled
# redis-server, and runs every stage that needs no CUDA (the gpu tests are skipped, saying why; the
# timing runs on the CPU, shortened).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check/out}
WORK=""
BUNDLE=${GPU_BUNDLE:-.gpu-bundle}
PY=""
BUDGET=450  # seconds: the issue's 8 minutes, less the bundle's install and a margin
DRY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --bundle) BUNDLE=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --budget-s) BUDGET=$2; shift 2 ;;
    --dry-run) DRY=(--dry-run); shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$PY" ]; then
  if [ ${#DRY[@]} -gt 0 ]; then PY=.venv/bin/python; else PY=$(command -v python3); fi
fi
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null; then
  echo "gpu-check: no Python at '$PY' (--python; the dry run uses the project's .venv: make setup)" >&2
  exit 2
fi
if [ ! -f "$BUNDLE/MANIFEST.json" ]; then
  echo "gpu-check: no bundle at $BUNDLE (make gpu-bundle, where the registries can be reached)" >&2
  exit 2
fi
WORK=${WORK:-runs/gpu-check/work}
mkdir -p "$OUT" "$WORK"
exec "$PY" scripts/gpu_check.py run --out "$OUT" --work "$WORK" --bundle "$BUNDLE" --python "$PY" \
  --budget-s "$BUDGET" "${DRY[@]}"
