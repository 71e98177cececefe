"""Planner speed and memory beside the trainers' consumption of ids.

    .venv/bin/python bench/oracle_speed.py [--batch-size 4096] [--iterations 30] [--trainers 2]
                                     [--planner fast|reference] [--ack-lag N] [--repeats 3]
                                     [--partitions 1,2,4,8] [--threads-per-partition 0,1]

Prints ids planned per second by the ``bagpipe`` policy (the compiled
planner, or ``--planner reference`` for the pure-Python specification it is
tested against), ids per second a trainer consumes (forward + backward +
update on its share of the batch, measured in-process on this machine) for
two dense models: the project's tiny default and a realistically sized DLRM
(bottom MLP 512-256-64-16, top MLP 512-256-1), the ratios, and the planner's
peak traced memory for tables of 1e5 rows and of 1e9 rows with the same
access pattern (it must not grow with table size).

By default nobody acknowledges write-backs, so the planner remembers the
version of every row it ever wrote back; ``--ack-lag N`` acknowledges them N
iterations behind the plan, as trainers' credits do in a real job.

``--partitions 1,2,4,8`` also plans the trace with each number of
partitions (``oracle.partitions``: the same cache split into K shares, K
planners in threads) and prints ids/s for each, its speed-up over one, and
ids/s per planning thread (ids/s over min(K, cores)), from which the
scaling on a host with more cores can be read. ``--threads-per-partition
0,1`` runs each partitioned case with those pool sizes inside every
partition, in turn (the default is ``oracle.partitions.partition_pool``'s
rule).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc


import numpy as np
import torch

from bagpipe.config import ModelConfig
from oracle import planner, reference
from oracle.partitions import PartitionedPlanner
from trainers.cache import SlotCache, slots_kjt
from trainers.models import build_dense_model

TINY = ModelConfig()
REALISTIC = ModelConfig(bottom_mlp=(512, 256, 64, 16), top_mlp=(512, 256, 1))


def zipf_trace(iterations: int, batch: int, tables: int, rows: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [((rng.zipf(1.15, size=(batch, tables)) - 1) * 7919) % rows for _ in range(iterations)]


def plan_rate(trace, batch: int, trainers: int, cache_rows: int, impl=planner, ack_lag: int = -1,
              track_memory: bool = False, partitions: int = 1, bypass: bool = True,
              threads_per_partition: int | None = None) -> tuple[float, int]:
    """Ids planned per second over the whole trace (flush included), and the peak traced memory."""
    cfg = impl.PlannerConfig("bagpipe", cache_rows, 2, 8, trainers, batch, len(trace), partitions=partitions,
                             bypass=bypass)
    plan = (impl.Planner(cfg, trace) if partitions == 1 else
            PartitionedPlanner(cfg, trace, backend=impl, threads_per_partition=threads_per_partition))
    if track_memory:
        tracemalloc.start()
    t0 = time.perf_counter()
    for i, _ in plan.plans():
        if ack_lag >= 0:
            plan.note_writebacks_applied(i - ack_lag)
    dt = time.perf_counter() - t0
    peak = 0
    if track_memory:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return len(trace) * batch * trace[0].shape[1] / dt, peak


def warm_up(tables: int) -> float:
    """Seconds to get the compiled kernels ready (loaded from numba's cache, or compiled the first time)."""
    t0 = time.perf_counter()
    # Long enough for the state to grow (rehash, queue compaction) and to forget acknowledged
    # write-backs: numba loads each kernel at its first call, which must not fall in the timed run.
    plan_rate(zipf_trace(12, 512, tables, 20_000), 512, 2, 8000, ack_lag=2)
    plan_rate(zipf_trace(4, 512, tables, 20_000), 512, 2, 8000, partitions=2)  # the split and merge kernels
    return time.perf_counter() - t0


def trainer_rate(model_cfg: ModelConfig, batch: int, tables: int, steps: int = 10) -> float:
    torch.manual_seed(0)
    model = build_dense_model(model_cfg, 13, tables)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.01)
    cache = SlotCache(200_000, model_cfg.embedding_dim, 1, torch.device("cpu"), "adagrad", 0.01, 1e-8)
    names = [f"t{i}" for i in range(tables)]
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        slots = torch.from_numpy(rng.integers(0, 200_000, size=(batch, tables)))
        dense = torch.randn(batch, 13)
        labels = torch.randint(0, 2, (batch,)).float()
        t0 = time.perf_counter()
        kt, leaf, uniq = cache.lookup(slots_kjt(names, slots))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, kt), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cache.apply_gradients(uniq, leaf.grad)
        times.append(time.perf_counter() - t0)
    return batch * tables / float(np.median(times[2:]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--trainers", type=int, default=2)
    parser.add_argument("--tables", type=int, default=26)
    parser.add_argument("--planner", choices=["fast", "reference"], default="fast")
    parser.add_argument("--repeats", type=int, default=3, help="planner runs; the median is compared")
    parser.add_argument("--ack-lag", type=int, default=-1, help="acknowledge write-backs this many iterations "
                        "behind the plan (-1: never)")
    parser.add_argument("--bypass", default="true", choices=["true", "false"], help="oracle_bypass")
    parser.add_argument("--partitions", default="", help="comma-separated partition counts to compare, e.g. 1,2,4,8")
    parser.add_argument("--threads-per-partition", default="",
                        help="each partition's own pool, comma-separated to compare in turn, e.g. 0,1 "
                             "(default: oracle.partitions.partition_pool's rule)")
    args = parser.parse_args()
    impl = planner if args.planner == "fast" else reference
    if impl is planner:
        print(f"planner kernels ready in {warm_up(args.tables):.1f} s (numba cache load, or first compile)")
    trace = zipf_trace(args.iterations, args.batch_size, args.tables, 1_000_000)
    cache = 60_000
    bypass = args.bypass == "true"
    runs = [plan_rate(trace, args.batch_size, args.trainers, cache, impl, args.ack_lag, bypass=bypass)[0]
            for _ in range(args.repeats)]
    planned = float(np.median(runs))
    acks = "never acknowledged" if args.ack_lag < 0 else f"acknowledged {args.ack_lag} iterations behind"
    print(f"planner ({args.planner}): median {planned:,.0f} ids/s of {len(runs)} runs "
          f"({', '.join(f'{r / 1e6:.2f}M' for r in runs)}; {args.trainers} trainers, batch {args.batch_size}, "
          f"{args.tables} tables, {args.iterations} iterations, cache {cache:,} rows, write-backs {acks})")
    if args.partitions:
        cores = os.cpu_count() or 1
        pools = [int(x) for x in args.threads_per_partition.split(",") if x] or [None]
        # One partition is the plain planner, with its own pool; every case runs once per repeat, the order
        # flipped every repeat, so the machine's drift stays out of the ratios.
        cases = [(k, pool) for k in (int(x) for x in args.partitions.split(",") if x)
                 for pool in (pools if k > 1 else [None])]
        runs: dict = {case: [] for case in cases}
        for r in range(args.repeats):
            for k, pool in (cases if r % 2 == 0 else cases[::-1]):
                runs[k, pool].append(plan_rate(trace, args.batch_size, args.trainers, cache, impl, args.ack_lag,
                                               partitions=k, bypass=bypass, threads_per_partition=pool)[0])
        base = float(np.median(runs[1, None])) if (1, None) in runs else None
        for (k, pool), got in runs.items():
            rate = float(np.median(got))
            label = f"partitions {k}" + ("" if pool is None else f", {pool} threads per partition")
            print(f"{label}: median {rate:,.0f} ids/s of {len(got)} runs "
                  f"({', '.join(f'{x / 1e6:.2f}M' for x in got)})"
                  + (f", {rate / base:.2f}x one partition" if base else "")
                  + f", {rate / min(k, cores):,.0f} ids/s per planning thread ({cores} cores)")
    local = args.batch_size // args.trainers
    for label, model_cfg in (("tiny DLRM, bottom 64-16, top 64-32-1", TINY),
                             ("realistic DLRM, bottom 512-256-64-16, top 512-256-1", REALISTIC)):
        consumed = trainer_rate(model_cfg, local, args.tables)
        print(f"trainers with the {label}: one consumes {consumed:,.0f} ids/s (local batch {local}), "
              f"all {args.trainers} {consumed * args.trainers:,.0f} ids/s; "
              f"planner / trainers = {planned / (consumed * args.trainers):.2f} (target >= 10)")
    small = zipf_trace(20, 1024, args.tables, 100_000, seed=1)
    huge = [t.astype(np.int64) * 10_007 for t in small]  # same pattern over 1e9 rows
    _, mem_small = plan_rate(small, 1024, 1, 20_000, impl, track_memory=True)
    _, mem_huge = plan_rate(huge, 1024, 1, 20_000, impl, track_memory=True)
    print(f"planner peak memory: {mem_small / 2**20:.1f} MiB with 1e5-row tables, "
          f"{mem_huge / 2**20:.1f} MiB with 1e9-row tables")


if __name__ == "__main__":
    main()
