"""The loop both planners run: one shell over two backends.

``oracle.reference.Planner`` (plain Python, the specification) and
``oracle.planner.Planner`` (compiled kernels) decide the same plans; what
they share is written here once: the config checks, the horizon, the stats,
the smallest workable cache, and the order of a step.

A step k, in that order, for every backend:

1. ``_step(k)``: bring the window up to k + horizon, retire iteration k-1's
   uses and choose what each trainer evicts after k-1 and fetches for k;
   returns the evictions after k-1 in the backend's own form;
2. ``_attach(plans, evictions, k - 1)``: settle who writes those back and
   put them on plan k-1, which is then complete and handed out;
3. ``_plan(k)``: plan k, only now, so that the write-backs acknowledged
   while the consumer held plan k-1 already decide the versions plan k's
   fetches name.

After the last step, ``_flush(after)`` evicts every cached row (each
written back once) onto the last plan. ``plans()`` then moves the fetches
ahead of their installs (``oracle.staging``).
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
    def plans(self) -> Iterator[tuple[int, list[Plan]]]:
        """Yield ``(i, plans)`` for i = 0..iterations-1, each a Plan per trainer."""
        return stage_fetches(self.on_demand_plans(), self.cfg.fetch_lead, self.stats)

    def on_demand_plans(self) -> Iterator[tuple[int, list[Plan]]]:
        """The plans with every fetch issued in the iteration that first reads the row (each plan
        installs exactly the fetches it issues); ``plans()`` moves the fetches ahead."""
        with self._running():
            prev: list[Plan] | None = None
            for k in range(self.iterations):
                evictions = self._step(k)
                if prev is not None:
                    self._attach(prev, evictions, k - 1)
                    yield k - 1, prev
                prev = self._plan(k)
            if prev is not None:
                self._attach(prev, self._flush(self.iterations - 1), self.iterations - 1)
                yield self.iterations - 1, prev

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

    def _attach(self, plans: list[Plan], evictions, after: int) -> None:
        raise NotImplementedError

    def _plan(self, k: int) -> list[Plan]:
        raise NotImplementedError

    def _flush(self, after: int):
        raise NotImplementedError

    def _forget_writebacks(self, through_iteration: int) -> None:
        raise NotImplementedError
