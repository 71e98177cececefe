"""Rows fetched per policy against Belady's MIN, at cache sizes relative to the rows a run touches.

    .venv/bin/python bench/fetches.py --data runs/data/criteo-2m/prepared [--batch-size 4096] [--iterations 400]

For each capacity (a fraction of the distinct rows the run reads), prints the
rows each policy fetches, its ratio to Belady's MIN, and the effect of the
horizon. Every policy here reads every row from a cache slot, so plain MIN is
the bound; MIN with bypass (a row read once goes through a per-batch scratch
buffer beside the cache, which no policy here has) is shown for reference.
Writes the table as Markdown to stdout and JSON beside ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


import numpy as np

from bagpipe.dataset import Dataset
from bagpipe.keys import batch_keys
from oracle.simulate import simulate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--fractions", default="0.01,0.05,0.2")
    parser.add_argument("--horizons", default="8,32,128")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/fetches.json"))
    args = parser.parse_args()
    sparse = Dataset(args.data).sparse_batches(args.batch_size, seed=0)
    iterations = min(args.iterations, len(sparse))
    seen: set[int] = set()
    most = 0
    for i in range(iterations):
        keys = batch_keys(sparse[i], sparse.column_tables)
        u = np.unique(keys[keys >= 0])  # a bag's pads are no row
        most = max(most, len(u))
        seen.update(u.tolist())
    distinct = len(seen)
    print(f"{iterations} iterations of {args.batch_size}: {distinct} distinct rows, at most {most} in one batch\n")
    horizons = [int(h) for h in args.horizons.split(",")]
    rows = []
    for frac in (float(f) for f in args.fractions.split(",")):
        cap = int(frac * distinct)
        if cap < most:
            print(f"capacity {frac:.0%} = {cap} rows < one batch's {most} rows: not workable at this batch size\n")
            continue
        result = {"fraction": frac, "cache_rows": cap}
        base = simulate(sparse, args.batch_size, cap, 1, 2, horizons[0], iterations,
                        ["lru", "lfu", "bagpipe-original", "belady", "belady-bypass"])
        result.update({p: r["rows_fetched"] for p, r in base.items()})
        result["bagpipe-original_peak"] = base["bagpipe-original"]["peak_resident_rows"]
        for h in horizons:
            r = simulate(sparse, args.batch_size, cap, 1, 2, h, iterations, ["bagpipe"])
            result[f"bagpipe H={h}"] = r["bagpipe"]["rows_fetched"]
            result[f"bagpipe H={h}_staged"] = r["bagpipe"]["peak_staged_rows"]
        rows.append(result)
        print(json.dumps(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"distinct": distinct, "most_per_batch": most, "rows": rows}, indent=1))
    print("\n| cache (of distinct rows) | MIN | MIN+bypass | " + " | ".join(f"bagpipe H={h}" for h in horizons)
          + " | lru | lfu | bagpipe-original (unbounded) | bagpipe / MIN | bagpipe / MIN+bypass | lru / bagpipe "
          "| lru / MIN |")
    print("| --- |" + " ---: |" * (9 + len(horizons)))
    for r in rows:
        best = min(r[f"bagpipe H={h}"] for h in horizons)
        print(f"| {r['fraction']:.0%} ({r['cache_rows']:,}) | {r['belady']:,} | {r['belady-bypass']:,} | "
              + " | ".join(f"{r[f'bagpipe H={h}']:,}" for h in horizons)
              + f" | {r['lru']:,} | {r['lfu']:,} | {r['bagpipe-original']:,} (peak {r['bagpipe-original_peak']:,} rows) | "
              f"{best / r['belady']:.3f} | {best / r['belady-bypass']:.3f} | {r['lru'] / best:.2f} | "
              f"{r['lru'] / r['belady']:.2f} |")
    print("\nPeak rows staged (fetched ahead, off the cache), bagpipe lead 2: "
          + "; ".join(f"{r['fraction']:.0%}: " + ", ".join(f"H={h} {r[f'bagpipe H={h}_staged']:,}" for h in horizons)
                      for r in rows))


if __name__ == "__main__":
    main()
