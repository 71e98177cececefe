"""The loop both planners run: one shell over two backends.

``oracle.reference.Planner`` (plain Python, the specification) and
``oracle.planner.Planner`` (compiled kernels) decide the same plans; what
they share is written here once: the config checks, the horizon, the stats,
the smallest workable cache, and the order of a step.

A step k, in that order, for every backend:

1. ``_step(k)``: bring the window up to k + horizon, retire iteration k-1's
   uses and choose what each trainer evicts after k-1 and fetches for k;
   returns the evictions after k-1 in the backend's own form;
2. ``_attach(evictions, k - 1)``: settle who writes those back; returns each
   trainer's ``evict_*`` fields, which complete plan k-1;
3. ``_plan(k)``: plan k, only now, so that the write-backs acknowledged
   while the consumer held plan k-1 already decide the versions plan k's
   fetches name; returns each trainer's other fields of plan k.

After the last step, ``_flush(after)`` evicts every cached row (each
written back once) onto the last plan.

The plan is built once, here, from those two records (``_plans``), and is
frozen (``bagpipe.wire.Plan``): nothing finishes it later. ``plans()`` hands
it to ``oracle.staging``, which derives the plan a trainer receives (its
fetches moved ahead, its iterations numbered for the run).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from bagpipe.keys import distinct_rows_per_trainer
from bagpipe.wire import Plan
from oracle.horizon import resolve as resolve_horizon
from oracle.planner_types import BatchSource, PlannerConfig, PlanStats, check_planned
from oracle.staging import stage_fetches


class PlannerShell:
    """Plans iterations 0..iterations-1 for every trainer (see the module docstring for the loop).

    Use ``plans()`` for the stream of ``(i, [Plan per trainer])``; ``on_demand_plans()`` for the
    plans with every fetch still in the iteration that first reads its row.
    """

    def __init__(self, cfg: PlannerConfig, batches: BatchSource) -> None:
        check_planned(cfg)
        cfg, self.horizon_choice = resolve_horizon(cfg, batches)
        self.cfg = cfg
        self.batches = batches
        self.n = cfg.trainers
        self.local_b = cfg.batch_size // cfg.trainers
        self.iterations = min(cfg.iterations, len(batches))
        self.stats = [PlanStats() for _ in range(self.n)]
        self.wb_applied_through = -1  # every write-back after iterations <= this has landed

    # ------------------------------------------------------------- the loop
    def plans(self, offset: int = 0) -> Iterator[tuple[int, list[Plan]]]:
        """Yield ``(i, plans)`` for i = 0..iterations-1, each a Plan per trainer; ``offset`` numbers the
        plans' iterations (and the write-back versions their fetches name) from there, as a segment of a
        longer run is numbered."""
        return stage_fetches(self.on_demand_plans(), self.cfg.fetch_lead, self.stats, offset)

    def on_demand_plans(self) -> Iterator[tuple[int, list[Plan]]]:
        """The plans with every fetch issued in the iteration that first reads the row (each plan
        installs exactly the fetches it issues); ``plans()`` moves the fetches ahead."""
        with self._running():
            planned: list[dict] | None = None  # plan k-1's fields, waiting for its evictions
            for k in range(self.iterations):
                evictions = self._step(k)
                if planned is not None:
                    yield k - 1, self._plans(k - 1, planned, self._attach(evictions, k - 1))
                planned = self._plan(k)
            if planned is not None:
                last = self.iterations - 1
                yield last, self._plans(last, planned, self._attach(self._flush(last), last))

    def _plans(self, k: int, planned: list[dict], evicted: list[dict]) -> list[Plan]:
        """Plan k of every trainer, built once from its planned and its evicted fields."""
        return [Plan(iteration=k, rank=t, **planned[t], **evicted[t]) for t in range(self.n)]

    # ------------------------------------------------------------- what both answer alike
    def min_cache_rows(self) -> int:
        """The smallest capacity that can run: the most distinct rows one trainer reads in one iteration."""
        tables = getattr(self.batches, "column_tables", None)
        return max((int(distinct_rows_per_trainer(self.batches[i], self.n, tables).max())
                    for i in range(self.iterations)), default=0)

    def note_writebacks_applied(self, through_iteration: int) -> None:
        """Write-backs after iterations <= ``through_iteration`` have landed (trainer acks)."""
        if through_iteration > self.wb_applied_through:
            self.wb_applied_through = through_iteration
            self._forget_writebacks(through_iteration)

    # ------------------------------------------------------------- the backend's part
    @contextmanager
    def _running(self):
        """Whatever the backend holds while it plans (the compiled one: its thread pool)."""
        yield

    def _step(self, k: int):
        raise NotImplementedError

    def _attach(self, evictions, after: int) -> list[dict]:
        """Per trainer, ``evict_slots``, ``evict_keys`` and ``evict_write`` of plan ``after``."""
        raise NotImplementedError

    def _plan(self, k: int) -> list[dict]:
        """Per trainer, every field of plan k but the iteration, the rank and the evictions."""
        raise NotImplementedError

    def _flush(self, after: int):
        raise NotImplementedError

    def _forget_writebacks(self, through_iteration: int) -> None:
        raise NotImplementedError
