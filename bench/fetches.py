"""Rows fetched per policy against Belady's MIN, at cache sizes relative to the rows a run touches.

    .venv/bin/python bench/fetches.py --data runs/data/criteo-2m/prepared [--batch-size 4096] [--iterations 400]

For each capacity (a fraction of the distinct rows the run reads), prints the
rows ``bagpipe`` fetches with its default settings (automatic horizon, bypass
through the scratch area), the same without bypass, at fixed horizons
(``--horizons``), and the baselines (``--baselines``), against Belady's MIN
(every row read from a cache slot) and MIN with bypass (a row that would be
the next victim itself goes through a per-iteration scratch area): the issue's
bound for a cache that has one. Writes the table as Markdown to stdout and
JSON beside ``--out``.
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
    parser.add_argument("--horizons", default="", help="fixed horizons to show beside 'auto' (comma-separated)")
    parser.add_argument("--baselines", default="lru,lfu,bagpipe-original")
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
    horizons = [int(h) for h in args.horizons.split(",") if h]
    baselines = [p for p in args.baselines.split(",") if p]
    rows = []
    for frac in (float(f) for f in args.fractions.split(",")):
        cap = int(frac * distinct)
        if cap < most:
            print(f"capacity {frac:.0%} = {cap} rows < one batch's {most} rows: not workable at this batch size\n")
            continue
        result = {"fraction": frac, "cache_rows": cap}
        base = simulate(sparse, args.batch_size, cap, 1, 2, "auto", iterations, baselines + ["belady", "belady-bypass"])
        result.update({p: r["rows_fetched"] for p, r in base.items()})
        if "bagpipe-original" in base:
            result["bagpipe-original_peak"] = base["bagpipe-original"]["peak_resident_rows"]
        for label, horizon, bypass in ([("default", "auto", True), ("no bypass", "auto", False)]
                                       + [(f"H={h}", h, True) for h in horizons]):
            r = simulate(sparse, args.batch_size, cap, 1, 2, horizon, iterations, ["bagpipe"], bypass=bypass)["bagpipe"]
            result[f"bagpipe {label}"] = r["rows_fetched"]
            result[f"bagpipe {label}_detail"] = {k: r[k] for k in ("peak_staged_rows", "rows_bypassed",
                                                                   "peak_scratch_rows", "horizon", "window_mb")}
        rows.append(result)
        print(json.dumps(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"distinct": distinct, "most_per_batch": most, "rows": rows}, indent=1))
    labels = ["default", "no bypass"] + [f"H={h}" for h in horizons]
    print("\n| cache (of distinct rows) | MIN | MIN+bypass | " + " | ".join(f"bagpipe {x}" for x in labels)
          + "".join(f" | {p}" for p in baselines) + " | default / MIN+bypass | default / MIN | scratch peak |")
    print("| --- |" + " ---: |" * (5 + len(labels) + len(baselines)))
    notes = []
    for r in rows:
        d, detail = r["bagpipe default"], r["bagpipe default_detail"]
        print(f"| {r['fraction']:.0%} ({r['cache_rows']:,}) | {r['belady']:,} | {r['belady-bypass']:,} | "
              + " | ".join(f"{r[f'bagpipe {x}']:,}" for x in labels)
              + "".join(f" | {r[p]:,}" for p in baselines)
              + f" | {d / r['belady-bypass']:.3f} | {d / r['belady']:.3f} | {detail['peak_scratch_rows']:,} |")
        notes.append(f"{r['fraction']:.0%}: horizon {detail['horizon']}, window {detail['window_mb']} MB, "
                     f"{detail['rows_bypassed']:,} rows bypassed, peak staged {detail['peak_staged_rows']:,}")
    print("\nbagpipe default: " + "; ".join(notes))


if __name__ == "__main__":
    main()
