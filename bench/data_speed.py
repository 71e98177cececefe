"""Data pipeline speed: synthesis, `prepare` and the batch reader, in rows per second.

    .venv/bin/python bench/data_speed.py [--rows 1000000] [--batch-size 4096] [--auc-rows 200000] [--multi-hot mlperf]

Synthesises N Criteo-format rows into a temporary directory, prepares them
(1M hash buckets, 5% eval split), then reads every full global batch in
order with shuffling: once through the full reader (dense, labels, ids) and
once through the sparse view the oracle uses. Last, as a check that the
synthetic labels are learnable, a hashed logistic regression (numpy,
row-wise Adagrad, one pass) trains on the first ``--auc-rows`` rows of the
shuffled train split and reports its AUC on the eval split, beside the AUC of
the generator's own hidden model (the best achievable).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time


import numpy as np

from bagpipe.log import init_logger
from data.prepare import PrepareConfig, prepare
from bagpipe.dataset import Dataset
from bagpipe.metrics import auc
from data.synth import SynthConfig, synthesise


def read_rate(reader) -> tuple[float, float]:
    """(rows/s over every batch in order, seconds to the first batch)."""
    t0 = time.perf_counter()
    reader[0]
    first = time.perf_counter() - t0
    for i in range(1, len(reader)):
        reader[i]
    elapsed = time.perf_counter() - t0
    return len(reader) * reader.cfg.batch_size // reader.cfg.world_size / elapsed, first


def logistic_auc(ds: Dataset, rows: int, batch: int = 1024, lr: float = 0.1) -> float:
    """Eval AUC of a logistic regression on one-hot row ids and the dense features.

    One weight per (table, row id); row-wise Adagrad on the ids seen in each
    minibatch, plain Adagrad on the dense weights; one pass over ``rows`` rows.
    """
    sizes = np.array([n for _, n in ds.tables], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    w = np.zeros(int(sizes.sum()), dtype=np.float32)
    acc = np.zeros_like(w)
    v = np.zeros(ds.num_dense + 1, dtype=np.float64)  # dense weights and the bias
    acc_v = np.zeros_like(v)
    reader = ds.batches(batch, seed=0)
    for i in range(min(len(reader), rows // batch)):
        b = reader[i]
        idx = (b.sparse + offsets).ravel()
        x = np.concatenate([b.dense, np.ones((len(b.labels), 1), np.float32)], axis=1).astype(np.float64)
        logit = w[idx].reshape(b.sparse.shape).sum(axis=1) + x @ v
        g = 1.0 / (1.0 + np.exp(-logit)) - b.labels  # d loss / d logit
        uniq, inv = np.unique(idx, return_inverse=True)
        gw = np.bincount(inv, weights=np.repeat(g, b.sparse.shape[1]), minlength=len(uniq)).astype(np.float32)
        acc[uniq] += gw * gw
        w[uniq] -= lr * gw / np.sqrt(acc[uniq] + 1e-8)
        gv = x.T @ g
        acc_v += gv * gv
        v -= lr * gv / np.sqrt(acc_v + 1e-8)
    ev = ds.batches(batch, shuffle=False, split="eval")
    scores, labels = [], []
    for i in range(len(ev)):
        b = ev[i]
        x = np.concatenate([b.dense, np.ones((len(b.labels), 1), np.float32)], axis=1)
        scores.append(w[(b.sparse + offsets)].sum(axis=1) + x @ v)
        labels.append(b.labels)
    return auc(np.concatenate(labels), np.concatenate(scores))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--auc-rows", type=int, default=200_000, help="0: skip the logistic regression")
    parser.add_argument("--multi-hot", default="", metavar="BAGS",
                        help="also make the data multi-hot (bagpipe data multi-hot --bags BAGS) and time its reader")
    args = parser.parse_args(argv)
    init_logger("bench", level="WARNING")
    results: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bagpipe-bench-data-") as tmp:
        raw, out = pathlib.Path(tmp) / "raw", pathlib.Path(tmp) / "prepared"
        t0 = time.perf_counter()
        report = synthesise(SynthConfig("criteo", args.rows, raw, seed=0))
        synth_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in report.files)
        results.append(("synth (criteo)", f"{args.rows / synth_s:>12,.0f} rows/s  ({synth_s:.1f} s, {size / 2**20:.0f} MiB)"))
        t0 = time.perf_counter()
        meta = prepare(PrepareConfig("criteo", tuple(report.files), out, hash_buckets=1_000_000,
                                     eval_fraction=0.05)).meta
        prep_s = time.perf_counter() - t0
        results.append(("prepare (criteo, plain)", f"{args.rows / prep_s:>12,.0f} rows/s  ({prep_s:.1f} s)"))
        ds = Dataset(out)
        full, first = read_rate(ds.batches(args.batch_size, seed=0))
        results.append((f"reader, B={args.batch_size}, shuffled", f"{full:>12,.0f} rows/s  (first batch {first:.2f} s)"))
        sparse, first = read_rate(ds.sparse_batches(args.batch_size, seed=0))
        results.append(("sparse view, same order", f"{sparse:>12,.0f} rows/s  (first batch {first:.2f} s)"))
        if args.multi_hot:
            from data.multihot import MultiHotConfig, materialize, parse_bags

            mh = pathlib.Path(tmp) / "multi-hot"
            t0 = time.perf_counter()
            materialize(MultiHotConfig(out, mh, parse_bags(args.multi_hot, len(ds.tables))))
            mh_s = time.perf_counter() - t0
            results.append((f"multi-hot ({args.multi_hot})", f"{args.rows / mh_s:>12,.0f} rows/s  ({mh_s:.1f} s)"))
            mds = Dataset(mh)
            full, first = read_rate(mds.batches(args.batch_size, seed=0))
            ids = len(mds.column_tables)
            results.append((f"multi-hot reader, B={args.batch_size}", f"{full:>12,.0f} rows/s  ({full * ids:,.0f} "
                            f"ids/s at {ids} a sample; first batch {first:.2f} s)"))
            sparse, first = read_rate(mds.sparse_batches(args.batch_size, seed=0))
            results.append(("multi-hot sparse view", f"{sparse:>12,.0f} rows/s  ({sparse * ids:,.0f} ids/s)"))
        results.append(("top 1% of rows take", f"{100 * report.top1pct_share:>11.1f}% of lookups (first "
                        f"{report.sample_rows:,} rows)"))
        results.append(("CTR", f"{report.ctr:>12.3f}"))
        results.append(("hidden model's AUC", f"{report.bayes_auc:>12.3f}  (best achievable)"))
        if args.auc_rows:
            t0 = time.perf_counter()
            lr_auc = logistic_auc(ds, min(args.auc_rows, meta["rows"]))
            results.append(("logistic regression AUC", f"{lr_auc:>12.3f}  ({min(args.auc_rows, meta['rows']):,} "
                            f"train rows, {meta['eval_rows']:,} eval rows, {time.perf_counter() - t0:.1f} s)"))
    width = max(len(k) for k, _ in results)
    print(f"{'measure':<{width}}  value")
    for k, val in results:
        print(f"{k:<{width}}  {val}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
