"""The Oracle Cacher's planner in plain Python: the executable specification.

This module is the readable statement of what a plan is. ``oracle.planner``
(the module everyone imports) computes the same plans with compiled kernels
(``oracle.fastplan``), and ``tests/test_planner_fast.py`` holds it to this
one array by array, for every policy. Change the rules here first, then
make the fast planner agree.

Given the sequence of global batches (sparse ids only), it decides for every
iteration and every trainer which rows to fetch into which cache slots,
which to evict and who writes them back, where every read finds its row, and
which rows' gradients are combined across trainers. ``oracle.process`` ships
these plans over ZeroMQ; ``oracle.simulate`` runs the same rules offline.

Consistency across trainers (episodes)
--------------------------------------
A row may sit in several trainers' caches at once. The set of trainers that
hold it, from the first fetch until the last of them evicts it, is an
*episode*. Every copy in an episode has the same value at every iteration:

* The first holders (*founders*) fetch the row from the store while nobody
  has updated it yet; they all install it at the episode's first use, so
  they all see every update.
* Once the episode is *live* (updated at least once), a trainer that needs
  the row *joins*: a holder contributes the row's value (embedding and
  optimizer state) to the iteration's all-reduce and the joiner receives it.
  The store is never read while a newer value sits in a cache.
* At every iteration, a row used by anyone and held by two or more trainers
  is *synced*: its gradient is all-reduced among all trainers and every
  holder applies the same update.
* The last holder to evict writes the row back with version = the iteration
  after which it was evicted. A later episode's fetch names that version;
  the trainer re-reads until the store has it (no stale read).

Capacity and prefetching: each trainer holds at most ``cache_rows`` rows.
Residency is decided on demand: a row takes a slot in the iteration that
first reads it, and the row displaced is the one used furthest in the future
(Belady's rule within the horizon). Only a batch whose own rows exceed the
capacity is refused, up front, with the smallest workable size. The store
fetches are then issued up to ``lead`` iterations earlier into the trainer's
staging area, off the cache (``oracle.staging``): prefetching moves traffic
off the critical path without taking slots early.

Bypass (the policies whose table row allows it, key ``oracle_bypass``): when
a full cache must make room for a row read at k, and that row, ranked with
its next use after k, would itself come first in the victim order, it does
not displace anyone. It takes a slot of a per-iteration *scratch area*
beside the cache (slots ``cache_rows``, ``cache_rows`` + 1, ... in the order
the rows are given slots) and is evicted right after k: fetched (or joined),
read, synced and written back like any row, for one iteration. Every
episode rule above holds unchanged.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from bagpipe.config import capacity_message
from bagpipe.keys import source_keys, trainer_keys
from bagpipe.policies import PLANNED, policy as policy_row
from oracle.planner_types import (INF, BatchSource, CapacityError, PlanError, PlannerConfig, PlanStats,  # noqa: F401
                                  check_planned)
from oracle.shell import PlannerShell

log = logging.getLogger("bagpipe")


@dataclass
class _IterRows:
    """One iteration's rows, per trainer."""

    keys: list[np.ndarray]  # [b, T] int64 per trainer
    uniq: list[np.ndarray]  # sorted unique keys per trainer (absent cells left out)
    inverse: list[np.ndarray]  # positions of keys in uniq, [b, T]; -1 for an absent cell


class _Episode:
    __slots__ = ("present", "pending", "live")

    def __init__(self) -> None:
        self.present: set[int] = set()  # trainers with the row installed
        self.pending: dict[int, int] = {}  # founder trainer -> fetch id, not yet installed
        self.live = False  # updated at least once


class _TrainerCache:
    """One trainer's residency: slots, next uses in the window and a lazy victim heap."""

    def __init__(self, capacity: int, bounded: bool) -> None:
        self.capacity = capacity
        self.bounded = bounded
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = []  # slots given back, reused first
        self.next_slot = 0  # slots [0, next_slot) have been handed out at least once
        self.uses: dict[int, deque[int]] = {}  # key -> its iterations of use in the window
        self.last_use: dict[int, int] = {}
        self.freq: dict[int, int] = {}
        self.heap: list[tuple] = []
        self.pending_fetch: dict[int, int] = {}  # key -> fetch id, fetched but not installed
        self.next_fetch_id = 0
        self.pinned: set[int] = set()
        self.scratch: list[int] = []  # rows in the scratch area for the iteration being planned, in slot order

    def next_use(self, key: int) -> int:
        q = self.uses.get(key)
        return q[0] if q else INF

    def take_slot(self) -> int | None:
        if self.free:
            return self.free.pop()
        if not self.bounded or self.next_slot < self.capacity:
            self.next_slot += 1
            return self.next_slot - 1
        return None


# Victim priority: smaller is evicted first. Each returns a tuple compared lexicographically.
def _prio_furthest(c: _TrainerCache, key: int) -> tuple:
    # Beyond the horizon all rows look alike; the less often used goes first.
    return (-c.next_use(key), c.freq.get(key, 0), c.last_use.get(key, -1), key)


def _prio_lru(c: _TrainerCache, key: int) -> tuple:
    return (c.last_use.get(key, -1), key)


def _prio_lfu(c: _TrainerCache, key: int) -> tuple:
    return (c.freq.get(key, 0), c.last_use.get(key, -1), key)


# By the policy table's ``victim``.
_PRIORITY: dict[str, Callable[[_TrainerCache, int], tuple]] = {
    "furthest": _prio_furthest,
    "lru": _prio_lru,
    "lfu": _prio_lfu,
}


class Planner(PlannerShell):
    """Plans iterations 0..iterations-1 for every trainer; see the module docstring, and
    ``oracle.shell`` for the loop (a step: ``_load`` and ``_advance``, ``_attach``, ``_plan``).

    Use ``plans()`` for the stream of ``(iteration, [Plan per trainer])``.
    The planner keeps only the window [current, current + horizon] of
    batches and hash maps of the rows resident or in the window: its memory
    grows with the window and the cache, never with table size.
    """

    def __init__(self, cfg: PlannerConfig, batches: BatchSource, pinned: list[set[int]] | None = None) -> None:
        super().__init__(cfg, batches)
        cfg = self.cfg  # with the horizon resolved
        self.caches = [_TrainerCache(cfg.cache_rows, cfg.rules.bounded) for _ in range(self.n)]
        self.priority = _PRIORITY[cfg.rules.victim]
        self.bypass = cfg.bypasses
        self.window: dict[int, _IterRows] = {}
        self.loaded = 0  # iterations [0, loaded) have entered the window
        self.episodes: dict[int, _Episode] = {}
        # version of the last write-back of a row whose write-back may not have landed yet
        self.last_wb: dict[int, int] = {}
        if cfg.rules.pins:
            if pinned is None:
                pinned = pinned_rows(cfg, batches)
            for c, rows in zip(self.caches, pinned):
                c.pinned = rows

    # ----------------------------------------------------------------- window
    def _load(self, upto: int) -> None:
        """Bring iterations [loaded, upto] into the window and record their uses."""
        while self.loaded <= min(upto, self.iterations - 1):
            i = self.loaded
            keys = source_keys(self.batches, i, self.n)
            if keys.shape[0] != self.cfg.batch_size:
                raise PlanError(f"batch {i} has {keys.shape[0]} rows, expected batch_size {self.cfg.batch_size}")
            rows = _IterRows([], [], [])
            for t, c in enumerate(self.caches):
                part = trainer_keys(keys, t, self.n)
                # A negative key is an absent cell (bagpipe.keys.ABSENT): another partition plans it.
                present = part >= 0
                uniq, inv = np.unique(part[present], return_inverse=True)
                inverse = np.full(part.shape, -1, np.int64)
                inverse[present] = inv.reshape(-1)
                rows.keys.append(part)
                rows.uniq.append(uniq)
                rows.inverse.append(inverse)
                if len(uniq) > c.capacity and c.bounded:
                    raise CapacityError(capacity_message(c.capacity, t, len(uniq), i, self.min_cache_rows()),
                                        t, len(uniq), i)
                for key in uniq.tolist():
                    q = c.uses.get(key)
                    if q is None:
                        c.uses[key] = deque((i,))
                    else:
                        if not q and key in c.slot_of:
                            q.append(i)
                            self._push(c, key)  # its next use was beyond the window
                            continue
                        q.append(i)
            self.window[i] = rows
            self.loaded += 1

    def _push(self, c: _TrainerCache, key: int) -> None:
        heapq.heappush(c.heap, (self.priority(c, key), key))

    def _forget_writebacks(self, through_iteration: int) -> None:
        """Write-backs after iterations <= ``through_iteration`` have landed: fetches no longer wait for them."""
        stale = [k for k, v in self.last_wb.items() if v <= through_iteration]
        for k in stale:
            del self.last_wb[k]

    # ------------------------------------------------------------ victims
    def _find_victim(self, c: _TrainerCache, need_at: int, skipped: list) -> int | None:
        """The resident row to evict for a row needed at ``need_at``, or None.

        Eligible: not pinned, and not read at ``need_at`` (the iteration being given its rows).
        """
        while c.heap:
            prio, key = c.heap[0]
            if key not in c.slot_of or key in c.pinned or prio != self.priority(c, key):
                heapq.heappop(c.heap)  # stale entry
                continue
            if c.next_use(key) <= need_at:
                if self.cfg.rules.victim == "furthest":
                    return None  # furthest next use is too soon: nothing better exists
                skipped.append(heapq.heappop(c.heap))
                continue
            heapq.heappop(c.heap)
            return key
        return None

    # ------------------------------------------------------------- planning (oracle.shell runs the loop)
    def _step(self, k: int) -> list[list[tuple[int, int]]]:
        self._load(k + self.cfg.horizon)
        return self._advance(k)

    def _advance(self, k: int) -> list[list[tuple[int, int]]]:
        """Retire iteration k-1's uses and choose what each trainer evicts after it: (key, slot) each."""
        evictions: list[list[tuple[int, int]]] = [[] for _ in range(self.n)]
        if k > 0:
            done = self.window.pop(k - 1)
            for t, c in enumerate(self.caches):
                for key in done.uniq[t].tolist():
                    q = c.uses[key]
                    q.popleft()
                    c.last_use[key] = k - 1
                    c.freq[key] = c.freq.get(key, 0) + 1
                    if not q and key not in c.slot_of:
                        del c.uses[key]
                    else:
                        self._push(c, key)
                # Policies that evict right after use, whatever the capacity.
                rule, used = self.cfg.rules.drops_after_use, done.uniq[t].tolist()
                if rule == "all":
                    drop = used
                elif rule == "unpinned":
                    drop = [x for x in used if x not in c.pinned]
                elif rule == "gap":
                    # The original rule: keep a row while its reuse gap is under the lookahead.
                    drop = [x for x in used if c.next_use(x) > k - 1 + self.cfg.horizon]
                else:
                    drop = []
                # The scratch area empties after every iteration (its rows in slot order), before any drop.
                evictions[t].extend((key, self._release(c, key, scratch=True)) for key in c.scratch)
                c.scratch = []
                evictions[t].extend((key, self._release(c, key)) for key in drop)
        self._acquire(k, evictions)
        return evictions

    def _release(self, c: _TrainerCache, key: int, scratch: bool = False) -> int:
        """Give up a row's slot (a scratch slot goes back to the scratch area, not to the cache); returns it."""
        slot = c.slot_of.pop(key)
        if not scratch:
            c.free.append(slot)
        c.freq.pop(key, None)
        if not c.uses.get(key):
            c.uses.pop(key, None)
            c.last_use.pop(key, None)
        return slot

    def _acquire(self, k: int, evictions: list[list[tuple[int, int]]]) -> None:
        """Give each trainer's rows read at k and not resident a slot, and choose the victims they displace."""
        self._new: list[list[tuple[int, int]]] = [[] for _ in range(self.n)]  # (key, slot)
        for t, c in enumerate(self.caches):
            skipped: list = []
            for key in self.window[k].uniq[t].tolist():
                if key in c.slot_of:
                    continue
                slot = c.take_slot()
                if slot is None:
                    victim = self._find_victim(c, k, skipped)
                    if victim is None:
                        raise PlanError(f"trainer {t} found no room for iteration {k}'s rows (internal error)")
                    if self.bypass and self._comes_first(c, key, k, victim):
                        self._push(c, victim)  # it stays, and stays first
                        slot = c.capacity + len(c.scratch)
                        c.scratch.append(key)
                        c.slot_of[key] = slot
                        self._new[t].append((key, slot))
                        self.stats[t].rows_bypassed += 1
                        continue
                    evictions[t].append((victim, self._release(c, victim)))
                    slot = c.take_slot()
                c.slot_of[key] = slot
                self._push(c, key)
                self._new[t].append((key, slot))
            for item in skipped:
                heapq.heappush(c.heap, item)
            resident = len(c.slot_of) - len(c.scratch)
            self.stats[t].peak_resident_rows = max(self.stats[t].peak_resident_rows, resident)
            self.stats[t].peak_scratch_rows = max(self.stats[t].peak_scratch_rows, len(c.scratch))

    def _comes_first(self, c: _TrainerCache, key: int, k: int, victim: int) -> bool:
        """Whether row ``key``, read at k and not resident, ranks before ``victim`` in the victim order once k
        is done: its next use after k, no frequency yet (it has not been resident), last use k."""
        q = c.uses[key]
        after = q[1] if len(q) > 1 else INF
        return (-after, 0, k, key) < self.priority(c, victim)

    def _plan(self, k: int) -> list[dict]:
        """Plan k's fields per trainer: fetches and joins of the new rows, installs, reads and syncs."""
        reads: list[np.ndarray] = []
        fetches: list[list[tuple[int, int]]] = [[] for _ in range(self.n)]  # (key, version)
        joins: dict[int, list[tuple[int, int, int]]] = {}  # key -> [(trainer, slot, send)]
        installs: list[list[tuple[int, int]]] = [[] for _ in range(self.n)]  # (fetch id, slot)
        first_ids = [c.next_fetch_id for c in self.caches]
        # 1. Where each new row comes from: a live episode (join), or the store.
        for t, c in enumerate(self.caches):
            for key, slot in self._new[t]:
                ep = self.episodes.get(key)
                if ep is not None and ep.live:
                    if key not in joins:  # the sender holds the row since before this iteration
                        sender = min(ep.present)
                        joins[key] = [(sender, self.caches[sender].slot_of[key], 1)]
                    joins[key].append((t, slot, 0))
                    ep.present.add(t)
                    self.stats[t].rows_joined += 1
                    continue
                if ep is None:
                    ep = self.episodes[key] = _Episode()
                fid = c.next_fetch_id
                c.next_fetch_id += 1
                c.pending_fetch[key] = fid
                ep.pending[t] = fid
                fetches[t].append((key, self.last_wb.get(key, -1)))
                self.stats[t].rows_fetched += 1
        # 2. Rows read at k: an episode not yet live goes live now, all founders install.
        rows = self.window[k]
        used_by: dict[int, list[int]] = {}
        for t, c in enumerate(self.caches):
            uniq = rows.uniq[t]
            slots = np.empty(len(uniq), dtype=np.int32)
            for idx, key in enumerate(uniq.tolist()):
                slots[idx] = c.slot_of[key]
                ep = self.episodes[key]
                if not ep.live:
                    for holder, fid in ep.pending.items():
                        hc = self.caches[holder]
                        installs[holder].append((fid, hc.slot_of[key]))
                        del hc.pending_fetch[key]
                        ep.present.add(holder)
                    ep.pending.clear()
                    ep.live = True
                used_by.setdefault(key, []).append(t)
            inverse = rows.inverse[t]
            read = np.full(inverse.shape, -1, np.int32)  # an absent cell reads nothing here
            read[inverse >= 0] = slots[inverse[inverse >= 0]]
            reads.append(read)
        # 3. Syncs: rows used now and held by two or more trainers.
        sync_keys = sorted(key for key in used_by if len(self.episodes[key].present) > 1)
        sync: list[list[tuple[int, int]]] = [[] for _ in range(self.n)]
        for pos, key in enumerate(sync_keys):
            for t in sorted(self.episodes[key].present):
                sync[t].append((pos, self.caches[t].slot_of[key]))
                self.stats[t].rows_synced += 1
        join_keys = sorted(joins)
        join_rows: list[list[tuple[int, int, int]]] = [[] for _ in range(self.n)]
        for pos, key in enumerate(join_keys):
            for t, slot, send in joins[key]:
                join_rows[t].append((pos, slot, send))
        planned = []
        for t, c in enumerate(self.caches):
            f = fetches[t]
            # The scratch area lies past the cache's slots; the trainer keeps the most it ever used.
            peak = self.stats[t].peak_scratch_rows
            planned.append(dict(
                read_slots=reads[t],
                fetch_keys=np.array([x[0] for x in f], dtype=np.int64),
                fetch_versions=np.array([x[1] for x in f], dtype=np.int64),
                first_fetch_id=first_ids[t],
                install_ids=np.array([x[0] for x in installs[t]], dtype=np.int64),
                install_slots=np.array([x[1] for x in installs[t]], dtype=np.int32),
                sync_pos=np.array([x[0] for x in sync[t]], dtype=np.int32),
                sync_slots=np.array([x[1] for x in sync[t]], dtype=np.int32),
                n_sync=len(sync_keys),
                join_pos=np.array([x[0] for x in join_rows[t]], dtype=np.int32),
                join_slots=np.array([x[1] for x in join_rows[t]], dtype=np.int32),
                join_send=np.array([x[2] for x in join_rows[t]], dtype=np.uint8),
                n_join=len(join_keys),
                slots_needed=c.capacity + peak if peak else c.next_slot))
        return planned

    def _attach(self, evictions: list[list[tuple[int, int]]], after: int) -> list[dict]:
        """Plan ``after``'s eviction fields per trainer; the last holder writes back."""
        ended: dict[int, int] = {}  # key -> writer
        for t in range(self.n):
            for key, _slot in evictions[t]:
                ep = self.episodes[key]
                ep.present.discard(t)
                if not ep.present and not ep.pending:
                    ended[key] = min(ended.get(key, t), t)
        for key in ended:
            del self.episodes[key]
            self.last_wb[key] = after
        evicted = []
        for t, ev in enumerate(evictions):
            write = [int(ended.get(key) == t) for key, _ in ev]
            self.stats[t].rows_written_back += sum(write)
            evicted.append(dict(evict_slots=np.array([slot for _, slot in ev], dtype=np.int32),
                                evict_keys=np.array([key for key, _ in ev], dtype=np.int64),
                                evict_write=np.array(write, dtype=np.uint8)))
        return evicted

    def _flush(self, after: int) -> list[list[tuple[int, int]]]:
        """After the last iteration every cached row is evicted (and, by ``_attach``, written back once)."""
        evictions: list[list[tuple[int, int]]] = [[] for _ in range(self.n)]
        for t, c in enumerate(self.caches):
            for key in list(c.slot_of):
                evictions[t].append((key, self._release(c, key)))
        return evictions


def pinned_rows(cfg: PlannerConfig, batches: BatchSource) -> list[set[int]]:
    """The ``static`` policy's pinned rows: each trainer's most frequent rows, counted in one pass.

    The pinned set leaves room in the cache for one iteration's other rows
    (a per-batch scratch area), so the capacity bound still holds.
    """
    iterations = min(cfg.iterations, len(batches))
    counts: list[dict[int, int]] = [dict() for _ in range(cfg.trainers)]
    per_iter_max = [0] * cfg.trainers
    for i in range(iterations):
        keys = source_keys(batches, i, cfg.trainers)
        for t in range(cfg.trainers):
            uniq = np.unique(trainer_keys(keys, t, cfg.trainers))
            uniq = uniq[uniq >= 0]  # absent cells (a partition's view) are no row
            per_iter_max[t] = max(per_iter_max[t], len(uniq))
            c = counts[t]
            for key in uniq.tolist():
                c[key] = c.get(key, 0) + 1
    pinned = []
    for t in range(cfg.trainers):
        room = cfg.cache_rows - per_iter_max[t]
        if room < 0:
            raise CapacityError(capacity_message(cfg.cache_rows, t, per_iter_max[t], None, max(per_iter_max)),
                                t, per_iter_max[t], None)
        ranked = sorted(counts[t].items(), key=lambda kv: (-kv[1], kv[0]))
        pinned.append({key for key, _ in ranked[:room]})
    return pinned
