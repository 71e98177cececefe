"""What both planners share: their config, stats, errors and the batches they read.

``oracle.reference`` (the executable specification) and ``oracle.planner``
(its compiled twin) both speak these types, and so does everything that
drives a planner (``oracle.partitions``, ``oracle.process``,
``oracle.simulate``); none of them needs the reference for its types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bagpipe.config import OracleConfig
from bagpipe.policies import PLANNED

INF = 1 << 62


class PlanError(ValueError):
    """The plan cannot be made with this configuration (for example, too small a cache)."""


class CapacityError(PlanError):
    """Trainer ``trainer`` reads ``need`` distinct rows in iteration ``iteration``, more than the cache holds
    (``oracle.partitions`` names the cache_rows that would do for its partitions)."""

    def __init__(self, message: str, trainer: int, need: int, iteration: int | None) -> None:
        super().__init__(message)
        self.trainer, self.need, self.iteration = trainer, need, iteration


class BatchSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> np.ndarray: ...


# The planners' config is the oracle's: policy, capacity, lead, horizon, trainers, batch, iterations.
PlannerConfig = OracleConfig


def check_planned(cfg: PlannerConfig) -> None:
    """Refuse a policy the oracle does not plan (``local`` holds every row in the trainers)."""
    if not cfg.rules.planned:
        raise PlanError(f"policy '{cfg.policy}' is not planned by the oracle ({', '.join(PLANNED)})")


@dataclass
class PlanStats:
    rows_fetched: int = 0
    rows_joined: int = 0
    rows_written_back: int = 0
    rows_synced: int = 0
    fetches_deferred: int = 0  # fetches issued with less than the lead: they wait for a write-back
    peak_resident_rows: int = 0  # in the cache proper (the scratch area not counted)
    peak_staged_rows: int = 0  # fetched ahead, waiting in the trainer's staging area
    rows_bypassed: int = 0  # given a scratch slot for one iteration instead of a place in the cache
    peak_scratch_rows: int = 0  # the most scratch slots one iteration used
