"""The compiled planner's state, in named records: what each array holds.

The kernels take these records (numba passes a ``NamedTuple`` of arrays as
one argument, at no cost per access), so a kernel's signature says which
parts of the state it reads, and the shell (``oracle.planner``) grows an
array by replacing one field (``record._replace``). The record fields are
numpy arrays whose columns ``oracle.fastplan.layout`` names. Inside the
kernels the arrays go by short local names (``E64`` for ``rows.entries``,
...), given where each entry kernel unpacks its records: the per-row loops
read better with them.

Axis 0 of every per-trainer array is the trainer.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Rows(NamedTuple):
    """Every trainer's rows: resident, or used in the window."""

    entries: np.ndarray  # E64 [n, cap, 8] int64: a 64-byte record per row; its int64 fields are X_*
    entries32: np.ndarray  # E32 [n, cap, 16] int32: the same memory; its int32 fields are Y_*
    free_entries: np.ndarray  # EFS [n, cap] int32: stack of free entries, M_EFREEN deep
    index: np.ndarray  # Hh [n, cells, 2] int64: open addressing, key -> entry + 1 (0: an empty cell)
    counters: np.ndarray  # M [n, M_LEN] int64: the M_* counters
    free_slots: np.ndarray  # S [n, *] int64: stack of free cache slots, M_FREEN deep
    stats: np.ndarray  # ST [n, S_LEN] int64: the PlanStats counters (S_*)
    pinned_keys: np.ndarray  # PK [n, width] int64: static's pinned rows, sorted
    pinned_count: np.ndarray  # PN [n] int64: how many of pinned_keys are real
    distinct: np.ndarray  # [n] int64: distinct rows of the iteration loaded last


class Window(NamedTuple):
    """The ring of R = horizon + 2 loaded iterations; iteration i sits in ring slot i % R, U = rows a
    trainer reads per iteration."""

    rows: np.ndarray  # Wu [n, R U] int32: per ring slot, its distinct rows' entries, sorted by key
    counts: np.ndarray  # Wn [n, R] int64: distinct rows per ring slot
    reads: np.ndarray  # Wi [n, R U] int32: per cell read, its row's rank among the distinct rows (-1: absent)
    next_use: np.ndarray  # Wx [n, R U] int32: per distinct row, the iteration that uses it next (INF32: none loaded)


class Queues(NamedTuple):
    """Each trainer's victim order (the package docstring says how)."""

    nodes: np.ndarray  # Q [n, *, 3] int64: queue nodes (entry, stamp, next node or -1), taken in append order
    lists: np.ndarray  # QH [n, lists, 3] int64: per list its head, tail and the end of its sorted prefix (-1)
    bucket_rows: np.ndarray  # QL [n, R + 1] int64: resident rows whose next use is in each ring slot; R: set A
    heap: np.ndarray  # HP [n, *, 5] int64: the rows too frequent for a list (order p0, p1, key; entry, stamp)
    heap_sizes: np.ndarray  # HN [n] int64


class Episodes(NamedTuple):
    """Rows across trainers: each row's episode (held by one or more trainers), and the versions of its
    write-backs not acknowledged yet."""

    records: np.ndarray  # GE [g, G_MASKS + 2 NW + N] int64: G_* fields, present and pending masks, holders
    index: np.ndarray  # Gh [cells, 2] int64: key -> record + 1
    free: np.ndarray  # GFS [g] int64: stack of free records, GM_FREEN deep
    counters: np.ndarray  # GM [GM_LEN] int64: the GM_* counters
    versions: np.ndarray  # LW [cells, 2] int64: key -> the iteration after which it was last written back + 1
    written: np.ndarray  # WQ [*, 2] int64: FIFO of (iteration, key) write-backs, to forget them in order


class StepBuffers(NamedTuple):
    """Scratch that every step reuses (fresh buffers would cost page faults at every step)."""

    load: np.ndarray  # WL [n, 6, U] int64: a trainer's loading scratch
    evictions: np.ndarray  # WEV [n, *, 4] int64: a trainer's evictions after k-1 (advance)
    new_rows: np.ndarray  # WNEW [n, *, 3] int64: a trainer's rows new at k: entry, slot, key (advance)
    counts: np.ndarray  # [n, 3] int64: per trainer, evictions, new rows and an error code (advance)
    all_evictions: np.ndarray  # WEVF [*, 4] int64: every trainer's evictions, trainer by trainer (finish_step)
    all_new_rows: np.ndarray  # WNEWF [*, 3] int64: every trainer's new rows (finish_step)
    new_offsets: np.ndarray  # new_off [n + 1] int64: where each trainer's new rows start in all_new_rows
    joins: np.ndarray  # WJR [*, 4] int64: the rows joined at k (plan_iteration)
    installs: np.ndarray  # WIN [*, 3] int64: the installs of k: holder, fetch id, slot (plan_iteration)

