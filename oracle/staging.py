"""Store fetches issued ahead of the iteration that installs them.

The planners decide residency on demand: a row takes a cache slot in the
iteration that first reads it, displacing the resident row used furthest in
the future, exactly as Belady's MIN would within the horizon. Prefetching
does not change those decisions; it only moves each store fetch earlier.
This stage takes the planner's on-demand plans and issues every fetch up to
``lead`` iterations before its install. Until then the fetched row waits in
the trainer's staging area (``trainers.storeio.StoreIO`` keeps rows by fetch
id, off the device), so a prefetch never takes a cache slot early and never
evicts anything.

Why not give the row its slot when the fetch is issued: with a cache smaller
than a few batches, the slots for rows ``lead`` iterations ahead can only be
found by evicting rows that are still valuable (the rows the current
iteration reads are not evictable yet), which cost 1.30x MIN's fetches at
5% of the distinct rows on synthetic Criteo (``bench/fetches.py``). Here the
fetch count is that of the on-demand plan, whatever the lead.

One rule keeps the reads fresh: a fetch is never issued before the last
write-back of its row, so a row written back after iteration e is fetched in
plan e + 1 at the earliest (a shorter lead, counted in ``fetches_deferred``)
and names that version as before. Fetch ids are renumbered in issue order.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Iterable, Iterator

import numpy as np

from bagpipe.wire import Plan


class _Received:
    """One on-demand plan set while its fetches wait to be issued, per trainer."""

    __slots__ = ("iteration", "plans", "issue_at", "issued_id")

    def __init__(self, iteration: int, plans: list[Plan]) -> None:
        self.iteration = iteration
        self.plans = plans
        self.issue_at: list[np.ndarray] = []  # per fetch: the iteration whose plan issues it
        self.issued_id: list[np.ndarray] = []  # per fetch: its id in issue order (-1 until issued)


def stage_fetches(plans: Iterable[tuple[int, list[Plan]]], lead: int, stats: list,
                  offset: int = 0) -> Iterator[tuple[int, list[Plan]]]:
    """The plans derived from on-demand ``plans``, each fetch issued up to ``lead`` iterations before its
    install, numbered from iteration ``offset``.

    ``plans`` must install in each iteration exactly the fetches it issues (the
    planners' on-demand plans do); they are left as they are. ``stats`` (one
    ``PlanStats`` per trainer) receive ``fetches_deferred`` and
    ``peak_staged_rows``. With an ``offset`` (a segment of a longer run), the
    plans' iterations and the write-back versions their fetches name are
    moved by it.
    """
    trainers = len(stats)
    waiting: deque[_Received] = deque()  # received, not yet emitted, oldest first
    next_id = [0] * trainers
    staged = [0] * trainers

    def receive(j: int, plans_j: list[Plan]) -> None:
        rec = _Received(j, plans_j)
        floor = max(j - lead, 0)  # plans before it have been emitted (emit() keeps the lead)
        for t, p in enumerate(plans_j):
            # A fetch names the version of its row's last write-back (the iteration after which it was
            # written; -1: none to wait for), so it can go out in plan version + 1 at the earliest. The
            # planners forget a version only once trainers have applied it, and they cannot have
            # applied a write-back after an iteration whose plan is not emitted: a forgotten version
            # is below the floor.
            at = np.maximum(p.fetch_versions + 1, floor)
            stats[t].fetches_deferred += int(np.count_nonzero(at > floor))
            rec.issue_at.append(at)
            rec.issued_id.append(np.full(len(at), -1, np.int64))
            if len(p.install_ids) != len(at):
                raise AssertionError(f"plan {j} trainer {t} installs other rows than it fetches (internal error)")
        waiting.append(rec)

    def emit() -> tuple[int, list[Plan]]:
        now = waiting.popleft()
        m = now.iteration
        staged_plans = []
        for t, p in enumerate(now.plans):
            keys, versions, issued = [], [], 0
            for rec in (now, *waiting):  # nearest need first
                here = np.flatnonzero(rec.issue_at[t] == m)
                rec.issued_id[t][here] = next_id[t] + issued + np.arange(len(here))
                keys.append(rec.plans[t].fetch_keys[here])
                versions.append(rec.plans[t].fetch_versions[here])
                issued += len(here)
            fetch_versions = np.concatenate(versions)
            if offset:  # -1 (no write-back to wait for) stays
                fetch_versions = np.where(fetch_versions >= 0, fetch_versions + offset, fetch_versions)
            # The on-demand plan installs its own fetches, numbered from its first fetch id.
            ids = now.issued_id[t][p.install_ids - p.first_fetch_id]
            if len(ids) and ids.min() < 0:
                raise AssertionError(f"plan {m} trainer {t} installs a row not fetched yet (internal error)")
            staged_plans.append(dataclasses.replace(p, iteration=m + offset, first_fetch_id=next_id[t],
                                                    fetch_keys=np.concatenate(keys), fetch_versions=fetch_versions,
                                                    install_ids=ids))
            next_id[t] += issued
            staged[t] += issued
            stats[t].peak_staged_rows = max(stats[t].peak_staged_rows, staged[t])
            staged[t] -= len(ids)
        return m + offset, staged_plans

    for j, plans_j in plans:
        receive(j, plans_j)
        while waiting and waiting[0].iteration + lead <= j:
            yield emit()
    while waiting:
        yield emit()
