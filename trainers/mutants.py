"""Planted bugs and injected faults on the trainer's side, chosen once, when a trainer is built.

``bagpipe check`` and the tests set ``BAGPIPE_MUTANT`` / ``BAGPIPE_FAULT``
(``bagpipe.faults``) in a job's environment; ``select`` reads them once and
returns the classes the trainer is built from. Each variant overrides one
rule of the real class, so the hot path never asks whether it is planted.

Mutants (the harness fails if one goes unnoticed):
- ``skip-sync``: a step that skips combining shared rows' gradients (``trainers.step.SkipSyncStep``);
- ``fetch-before-writeback``: write-backs held back three iterations and
  fetches that ignore versions, i.e. a fetch may read a row before its
  write-back landed.
Faults (each must leave the model identical, or stop the job saying why):
- ``writeback-delay``: the write-backs after one iteration land a second
  late, after fetches of the same rows were issued (the fetches wait for the
  row's version).
"""

from __future__ import annotations

import os
import time

import numpy as np

from bagpipe.faults import Fault
from trainers.storeio import StoreIO

MUTANT_ENV = "BAGPIPE_MUTANT"
MUTANTS = ("skip-sync", "fetch-before-writeback")


class StaleReadStoreIO(StoreIO):
    """Mutant: write-backs land three iterations late and fetches accept any version."""

    def __init__(self, *args, **kwargs) -> None:
        self._held: list[list[tuple]] = [[], [], [], []]
        super().__init__(*args, **kwargs)

    def _get(self, first_id: int, keys: np.ndarray, min_versions: np.ndarray) -> None:
        super()._get(first_id, keys, np.full_like(min_versions, -1))

    def _handle_put(self, op: tuple) -> None:
        self._held[-1].append(op)

    def _handle_mark(self, iteration: int) -> None:
        for held in self._held[0]:
            self._put(held)
        self._held = self._held[1:] + [[]]
        super()._handle_mark(iteration)

    def _before_drain(self) -> None:
        for _ in self._held:
            self._submit(("mark", self.written_through))


class LateWritebackStoreIO(StoreIO):
    """Fault: the write-backs after ``fault.iteration`` land a second late."""

    DELAY_S = 1.0

    def __init__(self, *args, fault: Fault, **kwargs) -> None:
        self.fault = fault
        self._late: list[tuple[float, tuple]] = []  # (release time, put op)
        super().__init__(*args, **kwargs)

    def _handle_put(self, op: tuple) -> None:
        if self.fault.hits("writeback-delay", op[3]):
            self._late.append((time.monotonic() + self.DELAY_S, op))
        else:
            self._put(op)

    def _handle_mark(self, iteration: int) -> None:
        # The watermark never passes a write-back that has not landed.
        late = min((p[3] for _, p in self._late), default=iteration + 1)
        self.written_through = min(iteration, late - 1)

    def _poll_s(self) -> float | None:
        return 0.05 if self._late else None

    def _tick(self) -> None:
        now = time.monotonic()
        due = [p for t, p in self._late if t <= now]
        self._late = [(t, p) for t, p in self._late if t > now]
        for op in due:
            self._put(op)


def _mutant(environ) -> str:
    mutant = environ.get(MUTANT_ENV, "")
    if mutant and mutant not in MUTANTS:
        raise ValueError(f"${MUTANT_ENV}={mutant!r}: unknown mutant (one of {', '.join(MUTANTS)})")
    return mutant


def select_step(environ=os.environ) -> type:
    """The step class for this process (read once). Imported here, not above: the store agent
    selects its store I/O from this module and must not pay for importing torch."""
    from trainers.step import SkipSyncStep, Step

    return SkipSyncStep if _mutant(environ) == "skip-sync" else Step


def select_store_io(environ=os.environ) -> tuple[type[StoreIO], dict]:
    """The store-I/O class and its extra arguments for this process (read once)."""
    fault = Fault.from_env()
    if _mutant(environ) == "fetch-before-writeback":
        return StaleReadStoreIO, {}
    if fault is not None and fault.kind == "writeback-delay":
        return LateWritebackStoreIO, {"fault": fault}
    return StoreIO, {}
