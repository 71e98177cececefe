"""Planner speed and memory beside the trainer's consumption of ids.

    .venv/bin/python bench/oracle.py [--batch-size 4096] [--iterations 30] [--trainers 2]

Prints ids planned per second by the ``bagpipe`` policy, ids per second a
trainer consumes (DLRM forward+backward+update on its share of the batch,
measured in-process on this machine), their ratio, and the planner's peak
traced memory for tables of 1e5 rows and of 1e9 rows with the same access
pattern (it must not grow with table size).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import tracemalloc

# Run as a script, Python puts bench/ first on the path, where this file would shadow
# the `oracle` package: import the project from the repository root instead.
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import numpy as np
import torch

from bagpipe.config import ModelConfig
from oracle.planner import Planner, PlannerConfig
from trainers.cache import SlotCache, slots_kjt
from trainers.models import build_dense_model


def zipf_trace(iterations: int, batch: int, tables: int, rows: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [((rng.zipf(1.15, size=(batch, tables)) - 1) * 7919) % rows for _ in range(iterations)]


def plan_rate(trace, batch: int, trainers: int, cache_rows: int, track_memory: bool = False) -> tuple[float, int]:
    cfg = PlannerConfig("bagpipe", cache_rows, 2, 8, trainers, batch, len(trace))
    planner = Planner(cfg, trace)
    if track_memory:
        tracemalloc.start()
    t0 = time.perf_counter()
    for _ in planner.plans():
        pass
    dt = time.perf_counter() - t0
    peak = 0
    if track_memory:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return len(trace) * batch * trace[0].shape[1] / dt, peak


def trainer_rate(batch: int, tables: int, steps: int = 10) -> float:
    torch.manual_seed(0)
    model = build_dense_model(ModelConfig(), 13, tables)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.01)
    cache = SlotCache(200_000, 16, 1, torch.device("cpu"), "adagrad", 0.01, 1e-8)
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
    args = parser.parse_args()
    trace = zipf_trace(args.iterations, args.batch_size, args.tables, 1_000_000)
    cache = 60_000
    planned, _ = plan_rate(trace, args.batch_size, args.trainers, cache)
    consumed = trainer_rate(args.batch_size // args.trainers, args.tables)
    print(f"planner: {planned:,.0f} ids/s ({args.trainers} trainers, batch {args.batch_size}, {args.tables} tables)")
    print(f"one trainer consumes: {consumed:,.0f} ids/s (local batch {args.batch_size // args.trainers})")
    print(f"all {args.trainers} trainers consume: {consumed * args.trainers:,.0f} ids/s")
    print(f"ratio planner / trainers: {planned / (consumed * args.trainers):.2f} (target >= 10)")
    small = zipf_trace(20, 1024, args.tables, 100_000, seed=1)
    huge = [t.astype(np.int64) * 10_007 for t in small]  # same pattern over 1e9 rows
    _, mem_small = plan_rate(small, 1024, 1, 20_000, track_memory=True)
    _, mem_huge = plan_rate(huge, 1024, 1, 20_000, track_memory=True)
    print(f"planner peak memory: {mem_small / 2**20:.1f} MiB with 1e5-row tables, "
          f"{mem_huge / 2**20:.1f} MiB with 1e9-row tables")


if __name__ == "__main__":
    main()
