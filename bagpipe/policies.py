"""Every cache policy, and everything the rest of the code asks about one, in one table.

A question about a policy ("does the oracle plan it?", "is it held to
``cache_rows``?", "how far ahead does it fetch?") is a lookup here, never a
list of names written out where the question comes up. Adding a policy is
one row below plus its rule in the planners (``oracle.reference`` states the
rules; ``oracle.fastplan`` computes them, keyed by ``code``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    """What one policy is; see the table ``POLICIES`` and DESIGN's policy list."""

    name: str
    planned: bool  # the oracle plans it (every policy but ``local``, which holds every row)
    bounded: bool  # a trainer's cache never holds more than ``cache_rows`` rows
    # Iterations before its install a row's store fetch is issued: "lead" (the config key) or a number.
    fetch_lead: str | int
    victim: str  # which resident row makes room: "furthest" next use, "lru" or "lfu"
    drops_after_use: str  # rows evicted right after the iteration that used them: "", "all", "unpinned", "gap"
    pins: bool  # the most frequent rows are pinned for the whole run (counted in one pass)
    # A missed row that would be the next victim itself reads through a per-iteration scratch area
    # instead of displacing a row (key 'oracle_bypass' turns it off); needs a bounded, "furthest" cache.
    bypass: bool
    code: int  # the planner kernels' number for it (oracle.fastplan); -1: not planned
    summary: str

    def lead(self, configured: int) -> int:
        """The fetch lead under a config whose ``lead`` key is ``configured``."""
        return configured if self.fetch_lead == "lead" else int(self.fetch_lead)


_TABLE = (
    Policy("local", planned=False, bounded=False, fetch_lead=0, victim="", drops_after_use="", pins=False,
           bypass=False, code=-1, summary="every table in trainer memory: the upper bound where it fits"),
    Policy("none", planned=True, bounded=False, fetch_lead=0, victim="lru", drops_after_use="all", pins=False,
           bypass=False, code=0, summary="no cache: fetch every row of a batch, write it back after the step"),
    Policy("lru", planned=True, bounded=True, fetch_lead=0, victim="lru", drops_after_use="", pins=False,
           bypass=False, code=1, summary="demand cache, least recently used out; misses fetched on the critical path"),
    Policy("lfu", planned=True, bounded=True, fetch_lead=0, victim="lfu", drops_after_use="", pins=False,
           bypass=False, code=2, summary="demand cache, least frequently used out"),
    Policy("lru-prefetch", planned=True, bounded=True, fetch_lead=1, victim="lru", drops_after_use="",
           pins=False, bypass=False, code=3,
           summary="LRU with the next iteration's misses fetched while this one trains (TorchRec's prefetch)"),
    Policy("static", planned=True, bounded=True, fetch_lead=0, victim="lru", drops_after_use="unpinned",
           pins=True, bypass=False, code=4,
           summary="the most frequent rows pinned, the rest fetched per batch (FAE)"),
    Policy("bagpipe", planned=True, bounded=True, fetch_lead="lead", victim="furthest", drops_after_use="",
           pins=False, bypass=True, code=5,
           summary="the Oracle Cacher: furthest next use out, fetches issued lead ahead"),
    Policy("bagpipe-original", planned=True, bounded=False, fetch_lead="lead", victim="furthest",
           drops_after_use="gap", pins=False, bypass=False, code=6,
           summary="the original rule: keep a row while its reuse gap is under the horizon, no capacity bound"),
)

POLICIES: dict[str, Policy] = {p.name: p for p in _TABLE}
NAMES: tuple[str, ...] = tuple(POLICIES)
PLANNED: tuple[str, ...] = tuple(p.name for p in _TABLE if p.planned)


class UnknownPolicy(ValueError):
    pass


def policy(name: str) -> Policy:
    """The table row of ``name``; raises ``UnknownPolicy`` naming the known ones."""
    try:
        return POLICIES[name]
    except KeyError:
        raise UnknownPolicy(f"'{name}' is not one of {', '.join(NAMES)}") from None
