"""``bagpipe simulate``: count what each policy fetches and writes back, offline.

It runs the live planner's code on the dataset's batch sequence (no store,
no trainers), beside Belady's MIN (the offline optimum: no policy can fetch
fewer rows), so a user can size a cache before renting machines.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time

import numpy as np

from bagpipe.config import ConfigError
from bagpipe.keys import source_keys, trainer_keys
from bagpipe.policies import PLANNED
from oracle.partitions import make_planner
from oracle.planner import INF, BatchSource, PlannerConfig, PlanError


def belady_fetches(batches: BatchSource, batch_size: int, trainers: int, capacity: int,
                   bypass: bool = False, iterations: int | None = None) -> list[int]:
    """Rows each trainer fetches under Belady's MIN with a cache of ``capacity`` rows.

    Every row read at iteration i must be resident at i. Misses evict the
    resident row used furthest in the future. With ``bypass``, a missed row
    whose next use is further than every resident row's is read through a
    per-batch scratch buffer instead of displacing anything (it still counts
    as a fetch).
    """
    iterations = min(iterations or len(batches), len(batches))
    per_trainer: list[list[np.ndarray]] = [[] for _ in range(trainers)]
    for i in range(iterations):
        keys = source_keys(batches, i, trainers)
        for t in range(trainers):
            per_trainer[t].append(np.unique(trainer_keys(keys, t, trainers)))
    out = []
    for seq in per_trainer:
        # next use of each (iteration, key), computed backwards
        nxt: list[list[int]] = [None] * len(seq)  # type: ignore[list-item]
        seen: dict[int, int] = {}
        for i in range(len(seq) - 1, -1, -1):
            keys = seq[i].tolist()
            nxt[i] = [seen.get(k, INF) for k in keys]
            for k in keys:
                seen[k] = i
        resident: dict[int, int] = {}  # key -> next use
        heap: list[tuple[int, int]] = []  # (-next use, key), lazy: stale entries are skipped
        fetched = 0
        for i, keys in enumerate(seq):
            klist = keys.tolist()
            # A row read at i carries next use i until this iteration is done, so it is the last
            # choice of victim: no scan past the rows in use (which made this quadratic).
            for k, nu in zip(klist, nxt[i]):
                if k in resident:
                    continue
                fetched += 1
                if len(resident) >= capacity:
                    while True:
                        neg, v = heapq.heappop(heap)
                        if resident.get(v) == -neg:
                            break
                    if -neg <= i:
                        raise PlanError(f"capacity {capacity} cannot hold iteration {i}'s rows")
                    if bypass and -neg < nu:
                        heapq.heappush(heap, (neg, v))
                        continue  # read through the scratch buffer; keep the cache as it is
                    del resident[v]
                resident[k] = i
                heapq.heappush(heap, (-i, k))
            for k, nu in zip(klist, nxt[i]):
                if k in resident:
                    resident[k] = nu
                    heapq.heappush(heap, (-nu, k))
        out.append(fetched)
    return out


def simulate(batches: BatchSource, batch_size: int, cache_rows: int, trainers: int, lead: int, horizon: int | str,
             iterations: int, policies: list[str], memory_mb: float = 1024.0, partitions: int = 1,
             bypass: bool = True) -> dict:
    report = {}
    for policy in policies:
        t0 = time.perf_counter()
        if policy in ("belady", "belady-bypass"):
            fetched = belady_fetches(batches, batch_size, trainers, cache_rows, policy == "belady-bypass", iterations)
            report[policy] = {"rows_fetched": int(sum(fetched)), "rows_written_back": None,
                              "peak_resident_rows": cache_rows, "seconds": time.perf_counter() - t0}
            continue
        cfg = PlannerConfig(policy, cache_rows, lead, horizon if horizon == "auto" else max(horizon, lead),
                            trainers, batch_size, iterations, memory_mb=memory_mb, partitions=partitions,
                            bypass=bypass)
        planner = make_planner(cfg, batches)
        for _ in planner.plans():
            pass
        st = planner.stats
        report[policy] = {
            "rows_fetched": sum(s.rows_fetched for s in st),
            "rows_joined": sum(s.rows_joined for s in st),
            "rows_written_back": sum(s.rows_written_back for s in st),
            "peak_resident_rows": max(s.peak_resident_rows for s in st),
            "rows_bypassed": sum(s.rows_bypassed for s in st),
            "peak_scratch_rows": max(s.peak_scratch_rows for s in st),
            "fetches_deferred": sum(s.fetches_deferred for s in st),
            "peak_staged_rows": max(s.peak_staged_rows for s in st),
            "horizon": planner.cfg.horizon,
            "horizon_reason": planner.horizon_choice.reason,
            "window_mb": round(planner.horizon_choice.window_bytes / 2**20, 3),
            "seconds": time.perf_counter() - t0,
        }
    return report


def write_trace(batches: BatchSource, iterations: int, path: str) -> None:
    """The access sequence as Parquet: iteration, table, row (one line per lookup)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    try:
        for i in range(iterations):
            rows = np.asarray(batches[i], dtype=np.int64)
            b, t = rows.shape
            tables = getattr(batches, "column_tables", None)
            tables = np.arange(t) if tables is None else tables
            present = rows.reshape(-1) >= 0  # a bag's pads are no lookup
            table = pa.table({"iteration": np.full(int(present.sum()), i, np.int64),
                              "table": np.tile(np.asarray(tables, dtype=np.int32), b)[present],
                              "row": rows.reshape(-1)[present]})
            if writer is None:
                writer = pq.ParquetWriter(path + ".tmp", table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    import os

    os.replace(path + ".tmp", path)


def _horizon(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'must be "auto" or a number of iterations, got {text!r}') from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagpipe simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a prepared dataset directory")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--cache-rows", type=int, required=True)
    parser.add_argument("--trainers", type=int, default=1)
    parser.add_argument("--lead", type=int, default=2)
    parser.add_argument("--horizon", type=_horizon, default="auto",
                        help='"auto" (sized to the cache within --oracle-memory-mb) or iterations')
    parser.add_argument("--oracle-memory-mb", type=float, default=1024.0)
    parser.add_argument("--oracle-partitions", type=int, default=1,
                        help="planners over disjoint rows, each in its share of the cache (docs/oracle.md)")
    parser.add_argument("--oracle-bypass", default="true", choices=["true", "false"],
                        help="rows that would be the next victim go through a scratch area (docs/oracle.md)")
    parser.add_argument("--iterations", type=int, default=0, help="0: one epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shuffle", default="true", choices=["true", "false"])
    parser.add_argument("--policies", default="bagpipe,bagpipe-original,lru,lfu,belady")
    parser.add_argument("--json", action="store_true", help="print one JSON object keyed by policy")
    parser.add_argument("--trace-out", help="write the access sequence as Parquet")
    args = parser.parse_args(argv)
    from bagpipe.dataset import Dataset

    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in PLANNED + ("belady", "belady-bypass"):
            print(f"bagpipe simulate: unknown policy '{p}'", file=sys.stderr)
            return 2
    sparse = Dataset(args.data).sparse_batches(args.batch_size, seed=args.seed, shuffle=args.shuffle == "true")
    iterations = min(args.iterations or len(sparse), len(sparse))
    if args.trace_out:
        write_trace(sparse, iterations, args.trace_out)
    try:
        report = simulate(sparse, args.batch_size, args.cache_rows, args.trainers, args.lead, args.horizon,
                          iterations, policies, args.oracle_memory_mb, args.oracle_partitions,
                          args.oracle_bypass == "true")
    except (PlanError, ConfigError) as exc:
        print(f"bagpipe simulate: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for p, r in report.items():
            print(f"{p:<18} fetched {r['rows_fetched']:>10}  written back {r['rows_written_back']}  "
                  f"peak resident {r['peak_resident_rows']}"
                  + (f"  bypassed {r['rows_bypassed']} (scratch peak {r['peak_scratch_rows']})"
                     if r.get("rows_bypassed") else "")
                  + (f"  horizon {r['horizon']} ({r['horizon_reason']}, window {r['window_mb']} MB)"
                     if "horizon" in r else ""))
    return 0
