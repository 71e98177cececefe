"""How far ahead the planner looks when ``horizon = "auto"``.

The planner decides which resident row to evict by its next use inside the
window [k, k + horizon]; beyond the window all rows look alike. A window that
holds few distinct rows beside the cache's capacity evicts rows it will read
again soon (issue 15: horizon 8 fetched 1.20x the optimum at a 20% cache,
horizon 64 1.02x). A window is long enough when, for every trainer, it holds
``COVER`` times the cache's capacity in distinct rows: then every resident
row but the rarely read has its next use inside it, and the evictions
Belady's rule picks inside the window are the ones it would pick with the
whole run in view.

The horizon is chosen once, before planning, by reading the first batches
as the planner will (the same batches, in the same order), so it is the same
on every run of the same job: plans stay deterministic. It is bounded by

* the run's iterations (no window past the end),
* ``MAX_AUTO`` iterations (a trace whose distinct rows never reach the
  target, such as a cache larger than the table, stops there), and
* the memory budget ``oracle_memory_mb``: the window's estimated bytes
  (``window_bytes``) stay within it. The estimate is what the planner's
  window arrays take: three int32 per lookup per trainer, and one 64-byte row
  entry, a 16-byte index cell and a 4-byte free-list slot per distinct row.

Choosing holds each batch's distinct keys per trainer (8 bytes a key) and sorts them at 1, 2, 4, ...
batches read, so it costs a few sorts of the window's keys, not a Python set of millions of rows.

What was chosen and why is returned as a ``HorizonChoice``: the oracle logs it
and reports it (``horizon``, ``horizon_reason``, ``window_mb`` and
``oracle_memory_mb`` in each trainer's entry of ``oracle_stats.json``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bagpipe.keys import source_keys, trainer_keys

COVER = 3  # distinct rows in the window per cache row (BENCHMARKS.md: 3 reaches the optimum at a 20% cache)
MAX_AUTO = 512  # iterations; beyond this the window costs more than it saves on any trace measured
ID_BYTES = 12  # per lookup per trainer: the window's row, inverse and index arrays (int32 each)
ROW_BYTES = 84  # per distinct row per trainer: a 64-byte entry, a 16-byte index cell, a 4-byte free slot


@dataclass(frozen=True)
class HorizonChoice:
    horizon: int
    reason: str  # "cover" | "memory" | "iterations" | "max" | "fixed"
    window_rows: int  # distinct rows the window held, summed over trainers (0 when fixed)
    window_bytes: int  # its estimated size
    memory_mb: float  # the budget

    def line(self) -> str:
        why = {"cover": f"the window holds {COVER}x the cache in distinct rows",
               "memory": "the memory budget oracle_memory_mb bounds it",
               "iterations": "the window reaches the run's end",
               "max": f"the longest automatic window ({MAX_AUTO} iterations)",
               "fixed": "set by the horizon key"}[self.reason]
        return (f"horizon {self.horizon} ({why}); window about {self.window_bytes / 2**20:.1f} MB "
                f"of oracle_memory_mb = {self.memory_mb:g}")


def window_bytes(lookups_per_trainer: int, trainers: int, horizon: int, distinct_rows: int) -> int:
    """Estimated bytes of a window of ``horizon + 2`` iterations holding ``distinct_rows`` (over trainers)."""
    return ID_BYTES * trainers * lookups_per_trainer * (horizon + 2) + ROW_BYTES * distinct_rows


def choose_horizon(batches, cache_rows: int, trainers: int, lead: int, iterations: int,
                   memory_mb: float, partitions: int = 1) -> HorizonChoice:
    """The shortest horizon >= ``lead`` whose window holds ``COVER * cache_rows`` distinct rows for
    every trainer, within the memory budget (see the module's docstring).

    Each batch's distinct keys per trainer are kept as int64 arrays (8 bytes a key, less than the
    window they measure takes); at 1, 2, 4, ... batches read, one sort per trainer gives the
    iteration of every key's first use, hence the distinct rows of every window 0..h at once."""
    budget = memory_mb * 2**20
    target = COVER * cache_rows
    lead = max(lead, 0)
    last = min(iterations, MAX_AUTO + 1)  # a window of horizon h reads batches 0 .. h
    per_batch: list[list[np.ndarray]] = [[] for _ in range(trainers)]
    held_bytes, lookups, check_at = 0, 0, 1
    for i in range(last):
        rows = np.asarray(batches[i])
        if rows.ndim != 2:
            last = i  # the planner names the bad batch when it loads it
            break
        try:
            keys = source_keys(batches, i, trainers)  # bags' pads stand in for real keys: no extra row
        except ValueError:
            last = i  # the planner names the bad batch when it loads it
            break
        # Every partition's window holds every cell (other partitions' as absent ones): K times the lookups.
        lookups = keys.size // trainers * partitions
        for t in range(trainers):
            part = np.unique(trainer_keys(keys, t, trainers))
            per_batch[t].append(part)
            held_bytes += part.nbytes
        read = i + 1
        if read < check_at and read < last and held_bytes <= budget:
            continue
        check_at = 2 * read
        distinct = _distinct_by_horizon(per_batch)  # [trainers, read]: distinct rows of batches 0..h
        total = distinct.sum(axis=0)
        for h in range(lead, read):
            if window_bytes(lookups, trainers, h, int(total[h])) > budget:
                h = max(lead, h - 1)
                return HorizonChoice(h, "memory", int(total[min(h, read - 1)]),
                                     window_bytes(lookups, trainers, h, int(total[min(h, read - 1)])), memory_mb)
            if (distinct[:, h] >= target).all():
                return HorizonChoice(h, "cover", int(total[h]), window_bytes(lookups, trainers, h, int(total[h])),
                                     memory_mb)
        if held_bytes > budget:  # a window this long would not fit either
            h = max(lead, read - 1)
            held = int(total[min(h, read - 1)])
            return HorizonChoice(h, "memory", held, window_bytes(lookups, trainers, h, held), memory_mb)
    if last == 0:
        return HorizonChoice(lead, "iterations", 0, 0, memory_mb)
    h = max(lead, last - 1)
    held = int(_distinct_by_horizon(per_batch).sum(axis=0)[-1])
    return HorizonChoice(h, "iterations" if last == iterations else "max", held,
                         window_bytes(lookups, trainers, h, held), memory_mb)


def _distinct_by_horizon(per_batch: list[list[np.ndarray]]) -> np.ndarray:
    """For each trainer and each h, the distinct keys in batches 0..h (int64 [trainers, batches])."""
    out = []
    for arrays in per_batch:
        keys = np.concatenate(arrays)
        when = np.repeat(np.arange(len(arrays)), [len(a) for a in arrays])
        _, first = np.unique(keys, return_index=True)  # the first occurrence in batch order
        out.append(np.cumsum(np.bincount(when[first], minlength=len(arrays))))
    return np.array(out, np.int64)


def fixed_horizon(horizon: int, memory_mb: float) -> HorizonChoice:
    return HorizonChoice(int(horizon), "fixed", 0, 0, memory_mb)


def resolve(cfg, batches):
    """``cfg`` with an integer horizon (chosen here when it is "auto") and the choice made."""
    import dataclasses

    memory_mb = getattr(cfg, "memory_mb", 1024.0)
    if cfg.horizon != "auto":
        return cfg, fixed_horizon(cfg.horizon, memory_mb)
    iterations = min(cfg.iterations, len(batches))
    choice = choose_horizon(batches, cfg.cache_rows, cfg.trainers, cfg.lead, max(iterations, 1), memory_mb,
                            getattr(cfg, "partitions", 1))
    return dataclasses.replace(cfg, horizon=choice.horizon), choice
