"""Compile the planner's kernels ahead of time (``make setup`` runs this), so a first job starts at once.

numba caches what it compiles beside ``oracle/fastplan.py`` (``cache=True``);
planning a tiny trace under every planned policy fills that cache. Later
processes load the kernels in well under a second; a changed kernel source
is compiled again on its first use, as before.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from bagpipe.policies import PLANNED
from oracle.partitions import PartitionedPlanner
from oracle.planner import Planner, PlannerConfig


def warm_up() -> float:
    """Plan a tiny trace with every planned policy and two trainers, then in two partitions (the split and
    merge kernels of ``oracle.partitions``); returns the seconds it took."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    trace = [rng.integers(0, 50, size=(8, 3)) for _ in range(6)]
    for policy in PLANNED:
        cfg = PlannerConfig(policy, 200, 1, 3, 2, 8, len(trace))
        for _ in Planner(cfg, trace).plans():
            pass
    for _ in PartitionedPlanner(PlannerConfig("bagpipe", 200, 1, 3, 2, 8, len(trace), partitions=2), trace).plans():
        pass
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    seconds = warm_up()
    print(f"planner kernels ready ({seconds:.1f}s: compiled now, or loaded from numba's cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
