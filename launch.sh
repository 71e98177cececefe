#!/usr/bin/env bash
# The main job. With no arguments: set up if needed, synthesise a Criteo-format
# dataset, prepare it, and train DLRM with 2 trainers, 2 redis-server shards and
# the bagpipe policy (configs/default.toml), then print the report.
#
# Environment (torchrun's vocabulary where it applies):
#   CONFIG        config file (default configs/default.toml)
#   RUN_DIR       run directory (default runs/default)
#   DATA_ROWS     rows of synthetic data to generate (default 200000)
#   NPROC_PER_NODE trainers on this node (overrides the config's 'trainers')
# Extra arguments are passed to `bagpipe run` (e.g. --set policy=lru).
set -euo pipefail
cd "$(dirname "$0")"

make -s setup
PY=.venv/bin/python
CONFIG=${CONFIG:-configs/default.toml}
RUN_DIR=${RUN_DIR:-runs/default}
DATA_ROWS=${DATA_ROWS:-200000}
DATA_DIR=${DATA_DIR:-runs/data/criteo-synth-${DATA_ROWS}}

if [ ! -f "$DATA_DIR/prepared/meta.json" ]; then
  echo "== synthesising $DATA_ROWS Criteo-format rows into $DATA_DIR/raw"
  $PY -m bagpipe data synth --format criteo --rows "$DATA_ROWS" --out "$DATA_DIR/raw" --seed 0 --files 2
  echo "== preparing Parquet in $DATA_DIR/prepared"
  $PY -m bagpipe data prepare --format criteo --input "$DATA_DIR"/raw/* --out "$DATA_DIR/prepared" \
    --hash-buckets 200000 --eval-fraction 0.05
fi

extra=()
[ -n "${NPROC_PER_NODE:-}" ] && extra+=(--set "trainers=$NPROC_PER_NODE")
echo "== training ($CONFIG) in $RUN_DIR"
exec $PY -m bagpipe run --config "$CONFIG" --set "data=$(pwd)/$DATA_DIR/prepared" --run-dir "$RUN_DIR" "${extra[@]}" "$@"
