#!/usr/bin/env bash
# The main job. With no arguments and no variables: set up if needed, synthesise a
# Criteo-format dataset, prepare it, and train DLRM with 2 trainers, 2 redis-server
# shards and the bagpipe policy (configs/default.toml), then print the report.
#
# Several nodes, in torchrun's vocabulary (variables or the matching flags):
#   NNODES / --nnodes            nodes in the job (default 1)
#   NODE_RANK / --node-rank      this node (0 runs the oracle and hosts the rendezvous)
#   NPROC_PER_NODE / --nproc-per-node   trainers on this node
#   MASTER_ADDR / --master-addr  node 0's address (default 127.0.0.1)
#   MASTER_PORT / --master-port  torchrun's port on node 0; MASTER_PORT+1 carries the endpoints
#   BAGPIPE_HOST / --host        the address this node's oracle and redis-server shards bind
#   SHARDS_PER_NODE / --shards-per-node S   start S redis-server shards on this node
#   --redis URL...               use existing embedding servers instead
#   --redis-cluster URL          use an existing Redis Cluster instead
# Other variables:
#   CONFIG        config file (default configs/default.toml)
#   RUN_DIR       run directory (default runs/default)
#   DATA_DIR      a prepared dataset (default: synthetic, made here when missing)
#   DATA_ROWS     rows of synthetic data to generate (default 200000)
#   SMOKE=1       a tiny job (20k rows, 20 iterations) to check an installation in a minute
# Anything else is passed to `bagpipe run` (e.g. --set policy=lru). See docs/multinode.md.
set -euo pipefail
cd "$(dirname "$0")"

make -s setup
PY=.venv/bin/python
CONFIG=${CONFIG:-configs/default.toml}
RUN_DIR=${RUN_DIR:-runs/default}
if [ "${SMOKE:-0}" = 1 ]; then
  DATA_ROWS=${DATA_ROWS:-20000}
  set -- --set iterations=20 --set batch_size=256 --set cache_rows=4000 "$@"
fi
DATA_ROWS=${DATA_ROWS:-200000}
# A config for multi-hot data names its bags in [synthetic_data] (configs/mlperf-dlrmv2-small.toml).
read -r MULTI_HOT BAG_LENGTHS < <($PY scripts/synthetic_data.py "$CONFIG")
ONE_HOT_DIR=runs/data/criteo-synth-${DATA_ROWS}/prepared
if [ "$MULTI_HOT" = none ]; then
  DATA_DIR=${DATA_DIR:-$ONE_HOT_DIR}
else
  DATA_DIR=${DATA_DIR:-runs/data/criteo-synth-${DATA_ROWS}/multi-hot-${MULTI_HOT//,/-}-${BAG_LENGTHS}}
fi
NODE_RANK=${NODE_RANK:-0}

if [ ! -f "$DATA_DIR/meta.json" ]; then
  if [ "$NODE_RANK" != 0 ]; then
    echo "launch.sh: no prepared dataset at $DATA_DIR on node $NODE_RANK: every node reads the data at the" \
      "same path (a shared filesystem, or prepare it on each node first)" >&2
    exit 1
  fi
  one_hot=$DATA_DIR
  [ "$MULTI_HOT" = none ] || one_hot=$ONE_HOT_DIR
  if [ ! -f "$one_hot/meta.json" ]; then
    raw="$(dirname "$one_hot")/raw"
    echo "== synthesising $DATA_ROWS Criteo-format rows into $raw"
    $PY -m bagpipe data synth --format criteo --rows "$DATA_ROWS" --out "$raw" --seed 0 --files 2
    echo "== preparing Parquet in $one_hot"
    $PY -m bagpipe data prepare --format criteo --input "$raw"/* --out "$one_hot" \
      --hash-buckets 200000 --eval-fraction 0.05
  fi
  if [ "$MULTI_HOT" != none ]; then
    echo "== making it multi-hot (bags $MULTI_HOT, lengths $BAG_LENGTHS) in $DATA_DIR"
    $PY -m bagpipe data multi-hot --input "$one_hot" --out "$DATA_DIR" --bags "$MULTI_HOT" --lengths "$BAG_LENGTHS"
  fi
fi

echo "== training ($CONFIG) in $RUN_DIR (node $NODE_RANK of ${NNODES:-1})"
data="$(cd "$DATA_DIR" && pwd)"
if [ "$NODE_RANK" = 0 ]; then
  exec $PY -m bagpipe run --config "$CONFIG" --set "data=$data" --run-dir "$RUN_DIR" "$@"
fi
# Other nodes take the config, the data path and the endpoints from node 0.
exec $PY -m bagpipe run --run-dir "$RUN_DIR" "$@"
