"""Faults injected on purpose, for ``bagpipe check`` and the tests: never set in a normal run.

``BAGPIPE_FAULT=kind[:iteration[:rank]]`` in a job's environment makes the
named process misbehave once, at that iteration (default 5) towards that
trainer (default 0). Each fault must either leave the model identical to the
reference or stop the job with a clear error; none may train a different
model silently.

- ``plan-delay``: the oracle holds the plan back for a while (model identical);
- ``plan-duplicate``, ``plan-reorder``, ``plan-drop``: the plan is sent twice,
  after the next one, or not at all (the trainer stops: out of order);
- ``plan-corrupt``: one byte of the plan's buffers flipped (checksum error);
- ``writeback-delay``: the trainer's write-backs after that iteration land
  only later, after fetches of the same rows were issued (the fetches wait
  for the row's version: model identical).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

KINDS = ("plan-delay", "plan-duplicate", "plan-reorder", "plan-drop", "plan-corrupt", "writeback-delay")
ENV = "BAGPIPE_FAULT"


@dataclass(frozen=True)
class Fault:
    kind: str
    iteration: int = 5
    rank: int = 0

    @classmethod
    def from_env(cls) -> "Fault | None":
        text = os.environ.get(ENV, "")
        if not text:
            return None
        parts = text.split(":")
        if parts[0] not in KINDS:
            raise ValueError(f"${ENV}={text!r}: unknown fault '{parts[0]}' (one of {', '.join(KINDS)})")
        try:
            nums = [int(p) for p in parts[1:3]]
        except ValueError:
            raise ValueError(f"${ENV}={text!r}: expected kind[:iteration[:rank]]") from None
        return cls(parts[0], *nums)

    def hits(self, kind: str, iteration: int, rank: int | None = None) -> bool:
        return self.kind == kind and self.iteration == iteration and (rank is None or rank == self.rank)
