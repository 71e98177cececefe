"""CPU placement: each trainer on cores of its own, the job's other processes on the rest.

In a cluster the oracle, the store agents and the embedding servers would
not share a trainer's host, let alone its cores. On one machine, placement
(config key ``cpu_placement = "auto"``) comes close: the cores this node may
use are split into one block per local trainer (its torch threads run
there) and a block for everything else (the oracle, the store agents, the
redis-server shards). With too few cores to give every trainer one and keep
one for the rest, nothing is pinned and the report says so.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

MODES = ("auto", "none")


@dataclass(frozen=True)
class Placement:
    """Cores per local trainer and for the job's other processes; empty: not pinned."""

    mode: str = "none"
    trainers: list[list[int]] = field(default_factory=list)  # by local rank
    services: list[int] = field(default_factory=list)
    reason: str = ""  # why nothing is pinned, when asked for and not done

    @property
    def pinned(self) -> bool:
        return bool(self.trainers)

    def trainer_cpus(self, local_rank: int) -> set[int] | None:
        return set(self.trainers[local_rank]) if self.pinned else None

    def service_cpus(self) -> set[int] | None:
        return set(self.services) if self.pinned else None

    def all_trainer_cpus(self) -> set[int] | None:
        return {c for cores in self.trainers for c in cores} if self.pinned else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Placement":
        return cls(**values)


def plan_placement(mode: str, local_trainers: int, cores: list[int] | None = None) -> Placement:
    """Split ``cores`` (default: those this process may run on) for ``local_trainers`` trainers.

    A quarter of the cores (at least one) go to the other processes, the rest
    are shared out evenly among the trainers (at least one each); what an
    even share leaves over goes to the other processes too.
    """
    if mode != "auto":
        return Placement()  # "none": nothing pinned
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if len(cores) < local_trainers + 1:
        return Placement(mode=mode, reason=f"{len(cores)} cores cannot give {local_trainers} trainer(s) one each "
                                           "and keep one for the oracle, store agents and shards")
    services = max(1, len(cores) // 4)
    per = max(1, (len(cores) - services) // local_trainers)
    trainers = [cores[r * per:(r + 1) * per] for r in range(local_trainers)]
    return Placement(mode=mode, trainers=trainers, services=cores[local_trainers * per:])
