"""Partitioned planning: K planners over disjoint rows, merged into one plan per trainer per iteration.

The rows are split by a hash of their key (``bagpipe.keys.partition_of``:
splitmix64(key) % K). Partition p owns a fixed share of every trainer's
cache slots (``bagpipe.config.partition_shares``: cache_rows split as evenly
as possible, partition p's slots starting where p - 1's end) and is planned
by a planner of its own, over a view of the batches in which every cell of
another partition is ``ABSENT`` (a negative key: the planners add no row
for it and give it read slot -1). The partitions' rows are disjoint, so
their episodes, syncs, joins, write-backs and versions are too: each plan
is one of the plain planner's plans, for a cache of its share.

The K planners run in threads (the compiled kernels release the GIL) and
advance in lockstep, one iteration each. Their on-demand plans (every fetch
installed by the plan that issues it) are merged in partition order, per
trainer:

* ``read_slots``: each cell from the partition that owns its key, its slot
  moved to the partition's share;
* fetches concatenated, and their ids renumbered into the trainer's one
  numbering in that order (installs follow them);
* sync and join positions offset by the rows of the partitions before;
* evictions concatenated, slots moved to the share;
* ``slots_needed``: the end of the last share in use.

Then ``oracle.staging`` issues the merged fetches ahead once, as it does for
one planner. So the merged plans are a pure function of the trace and K,
whatever the threads do, and an ordinary ``Plan``: the trainers need no
change. With K = 1 they are the unpartitioned planner's plans, array for
array (``tests/test_oracle_partitions.py``).

Policies not held to ``cache_rows`` (``none``, ``bagpipe-original``) have no
share to stay in: their partitions' slots interleave instead (slot s of
partition p is s K + p), so they never collide however many each takes.

A batch whose rows in one partition exceed its share is refused, when the
partition's planner loads it (``bagpipe run`` checks the first batches
before anything starts), naming the smallest cache_rows that works with K
partitions (``bagpipe.config.smallest_partitioned_cache``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
from numba import njit

from bagpipe.config import partition_capacity_message, partition_shares, smallest_partitioned_cache
from bagpipe.keys import ABSENT, distinct_rows_per_partition, source_keys
from bagpipe.wire import Plan
from oracle import planner as fast
from oracle.horizon import resolve as resolve_horizon
from oracle.planner_types import BatchSource, CapacityError, PlanError, PlannerConfig, PlanStats, check_planned
from oracle.staging import stage_fetches

__all__ = ["PartitionedPlanner", "make_planner"]


def make_planner(cfg: PlannerConfig, batches: BatchSource, remote: dict | None = None):
    """The planner for ``cfg``: the plain compiled one for one partition, else a ``PartitionedPlanner``
    (``remote``: the partitions other processes plan, ``oracle.workers``)."""
    if cfg.partitions == 1:
        return fast.Planner(cfg, batches)
    return PartitionedPlanner(cfg, batches, remote=remote)


# ------------------------------------------------------------ kernels (numba, no GIL)
# Per cell of every batch, so in numpy they cost more than the planners' own work: a boolean mask
# that is true for a random half of the cells defeats branch prediction (2.4 ms per 100k cells).
@njit(nogil=True, cache=True)
def _owners(keys, k):
    """Each cell's partition: ``bagpipe.keys.partition_of`` (splitmix64(key) % k), computed per cell."""
    out = np.empty(keys.shape, np.int32)
    flat, owner = keys.reshape(-1), out.reshape(-1)
    for x in range(flat.size):
        z = np.uint64(flat[x]) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        owner[x] = z % np.uint64(k)
    return out


@njit(nogil=True, cache=True)
def _view(keys, owners, p):
    """The keys of partition p's cells, ``ABSENT`` in the others."""
    out = np.empty_like(keys)
    flat, owner, view = keys.reshape(-1), owners.reshape(-1), out.reshape(-1)
    for x in range(flat.size):
        view[x] = flat[x] if owner[x] == p else ABSENT
    return out


@njit(nogil=True, cache=True)
def _place_reads(out, read, p, base, share, total, k, bounded):
    """Partition p's read slots into ``out`` (its cells only, moved as ``PartitionedPlanner._slots`` moves
    them); returns how many cells of ``out`` no partition up to p has read."""
    flat, dst = read.reshape(-1), out.reshape(-1)
    unread = 0
    # Without a branch on whether p reads the cell (true for a random 1/K of them, which defeats
    # prediction): the moved slot is computed for every cell and selected.
    for x in range(flat.size):
        r = flat[x]
        if not bounded:
            moved = r * k + p
        elif r < share:  # nearly always: the scratch area past the share is small
            moved = r + base
        else:
            moved = total + (r - share) * k + p
        mine = r >= 0
        kept = dst[x]
        dst[x] = moved if mine else kept
        unread += (not mine) & (kept < 0)
    return unread


def partition_pool(trainers: int, cores: int, stepping_threads: int) -> int:
    """Threads in each partition's own pool (its trainers' kernels, its next batch's loading), 0: none.

    A partition's stepping thread is one core already; the cores left over per partition go to its
    trainers' kernels. Where they leave it less than a second core there is no pool: a pool of one
    beside the stepping thread only adds hand-offs, and the two compete for the same cores
    (BENCHMARKS.md, "Partitioned planning", has the figures).
    """
    per = cores // max(stepping_threads, 1)
    return min(trainers, per) if per >= 2 else 0


class _Split:
    """The batches' plan keys with each cell's partition, for the partitions' views.

    The K planners load batch i at about the same time, each in its thread: the first to ask
    reads and hashes it, the others find it here; it is dropped once every partition has taken
    it. At most ``keep`` batches are held (the planners advance in lockstep, a window apart at
    most); one dropped for room and asked again (``static``'s counting pass) is read again.
    """

    def __init__(self, batches: BatchSource, trainers: int, partitions: int, keep: int, takers: int | None = None) -> None:
        self.batches, self.trainers, self.partitions, self.keep = batches, trainers, partitions, keep
        self.takers = partitions if takers is None else takers  # the partitions planned in this process
        self._lock = threading.Lock()
        self._recent: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._taken: dict[int, set[int]] = {}  # batch -> the partitions that have taken it

    def __len__(self) -> int:
        return len(self.batches)

    def keys(self, i: int, partition: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch i's plan keys [B, S] (pads standing in for a real key) and each cell's partition."""
        with self._lock:
            got = self._recent.get(i)
            if got is None:
                try:
                    keys = np.ascontiguousarray(source_keys(self.batches, i, self.trainers), dtype=np.int64)
                except ValueError as exc:
                    raise PlanError(f"batch {i}: {exc}") from None
                got = self._recent[i] = (keys, _owners(keys, self.partitions))
                self._taken[i] = set()
                while len(self._recent) > self.keep:
                    old, _ = self._recent.popitem(last=False)
                    del self._taken[old]
            taken = self._taken[i]
            taken.add(partition)
            if len(taken) == self.takers:
                del self._recent[i], self._taken[i]
            return got


class _View:
    """Partition p's view of the batches: the plan keys, ``ABSENT`` where another partition plans the cell."""

    keys_planned = True  # bagpipe.keys.source_keys takes these keys as they are

    def __init__(self, split: _Split, partition: int) -> None:
        self.split, self.partition = split, partition
        self._last: tuple[int, np.ndarray] | None = None  # the planner reads a batch twice as it loads it

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        keys, owners = self.split.keys(i, self.partition)
        view = _view(keys, owners, self.partition)
        self._last = (i, view)
        return view


class PartitionedPlanner:
    """Plans like ``oracle.planner.Planner`` (same interface), with ``cfg.partitions`` planners; see the module
    docstring. ``backend`` is the planner module each partition uses (``oracle.planner``, or
    ``oracle.reference`` for the differential test)."""

    def __init__(self, cfg: PlannerConfig, batches: BatchSource, backend=fast, workers: int | None = None,
                 local: list[int] | None = None, remote: dict | None = None,
                 threads_per_partition: int | None = None) -> None:
        """``local``: the partitions planned here (all but ``remote``'s when None); ``remote``: partition ->
        a stream of its on-demand plans planned elsewhere (``oracle.workers.RemotePartition``);
        ``workers``: threads stepping the partitions (default: one per partition, up to the cores);
        ``threads_per_partition``: each partition's own pool (``partition_pool``'s rule by default)."""
        check_planned(cfg)
        # One horizon for every partition, chosen on the whole batches: a partition sees 1/K of the rows
        # with 1/K of the slots, so the same window covers its share as well.
        cfg, self.horizon_choice = resolve_horizon(cfg, batches)
        self.cfg, self.batches = cfg, batches
        self.n, self.k = cfg.trainers, cfg.partitions
        self.iterations = min(cfg.iterations, len(batches))
        self.shares = partition_shares(cfg.cache_rows, self.k)
        self.bases = np.concatenate([[0], np.cumsum(self.shares)[:-1]]).astype(np.int64).tolist()
        self.bounded = cfg.rules.bounded
        self.stats = [PlanStats() for _ in range(self.n)]
        self.wb_applied_through = -1
        cores = os.cpu_count() or 1
        remote = dict(remote or {})
        self.local = sorted(set(range(self.k)) - set(remote) if local is None else local)
        if set(self.local) & set(remote) or not set(self.local) <= set(range(self.k)):
            raise AssertionError(f"partitions {self.local} here and {sorted(remote)} elsewhere (internal error)")
        self.workers = min(len(self.local), cores) if workers is None else workers
        split = _Split(batches, self.n, self.k, keep=cfg.horizon + 4, takers=len(self.local))
        self.parts = []
        for p, share in enumerate(self.shares):
            if p in remote:
                self.parts.append(remote[p])
                continue
            if p not in self.local:
                self.parts.append(None)  # another process plans it, and this one does not merge
                continue
            part_cfg = dataclasses.replace(cfg, cache_rows=share, partitions=1, workers=0)
            try:
                if backend is fast:
                    inner = (partition_pool(self.n, cores, self.workers) if threads_per_partition is None
                             else threads_per_partition)
                    self.parts.append(fast.Planner(part_cfg, _View(split, p), workers=inner))
                else:
                    self.parts.append(backend.Planner(part_cfg, _View(split, p)))
            except CapacityError as exc:  # static's pinned rows leave no room in the share
                raise self._capacity_error(p, exc) from None
        self._next_fetch = [0] * self.n
        self._resident = [0] * self.n

    # ---------------------------------------------------------- the planner's interface
    def plans(self, offset: int = 0) -> Iterator[tuple[int, list[Plan]]]:
        """Yield ``(i, plans)`` for i = 0..iterations-1, each a Plan per trainer (numbered from ``offset``,
        as ``oracle.shell.PlannerShell.plans``)."""
        return stage_fetches(self.on_demand_plans(), self.cfg.fetch_lead, self.stats, offset)

    def note_writebacks_applied(self, through_iteration: int) -> None:
        """Write-backs after iterations <= ``through_iteration`` have landed (trainer acks).

        Noted here only: each partition takes it in its own thread, before the next step it starts
        (``_lockstep``), since a partition may be stepping while its caller reads a merged plan.
        """
        self.wb_applied_through = max(self.wb_applied_through, through_iteration)

    def min_cache_rows(self) -> int:
        """The smallest capacity that can run with these partitions (``smallest_partitioned_cache``)."""
        return smallest_partitioned_cache(self._most_per_partition())

    def state_rows(self) -> int:
        """Rows of planner state in this process (partitions planned elsewhere count there)."""
        return sum(self.parts[p].state_rows() for p in self.local)

    def state_nbytes(self) -> int:
        return sum(self.parts[p].state_nbytes() for p in self.local)

    # ---------------------------------------------------------- planning
    def on_demand_plans(self) -> Iterator[tuple[int, list[Plan]]]:
        """The merged plans, every fetch installed by the plan that issues it."""
        if any(part is None for part in self.parts):
            raise AssertionError("a planner of some partitions only cannot merge (internal error)")
        for k, got in self._lockstep(range(self.k)):
            yield k, self._merge(k, got)

    def partition_plans(self) -> Iterator[tuple[int, list[list[Plan]]]]:
        """Per iteration, the on-demand plans of each partition planned here (in ``self.local``'s order),
        unmerged: what a worker process streams to the oracle (``oracle.workers``)."""
        return self._lockstep(self.local)

    def _lockstep(self, which: list[int]) -> Iterator[tuple[int, list[list[Plan]]]]:
        """Iteration by iteration, each partition in ``which`` one step (the local ones in threads).

        The partitions step to iteration k + 1 while the caller merges and stages k (the merge and
        staging run in the caller's thread: left in series, they kept a core idle for a fifth of each
        iteration). Each step takes the acknowledgements noted before it started, so the plans do not
        depend on the threads' timing: an acknowledgement noted after plan k is handed out reaches the
        partitions at step k + 2, one step later than without the overlap (forgetting a landed write-back
        later only keeps its version longer; ``tests/test_oracle_partitions.py`` checks the plans).
        """
        streams = {p: self.parts[p].on_demand_plans() for p in which}
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="partition") if self.workers else None
        pending: list = []

        def start() -> list:
            """Step every partition once, with the acknowledgements noted so far: futures, or (no pool)
            the results, an exception standing in for a partition that failed."""
            acked = self.wb_applied_through
            if pool is not None:
                return [pool.submit(self._next, p, streams[p], acked) for p in which]
            got = []
            for p in which:
                try:
                    got.append(self._next(p, streams[p], acked))
                except Exception as exc:  # raised once iteration k's plans are out, as a thread's would be
                    got.append(exc)
            return got

        try:
            if self.iterations:
                pending = start()
            for k in range(self.iterations):
                got = [job.exception() or job.result() for job in pending] if pool is not None else pending
                pending = []
                for item in got:  # the first partition in order that failed names the error
                    if isinstance(item, BaseException):
                        raise item
                for p, (i, _) in zip(which, got):
                    if i != k:
                        raise AssertionError(f"partition {p} planned iteration {i} when {k} was due (internal error)")
                if k + 1 < self.iterations:
                    pending = start()
                yield k, [plans for _, plans in got]
        finally:
            if pool is not None:
                for job in pending:  # a step still running holds its stream: let it finish first
                    job.exception()
            for s in streams.values():
                s.close()  # each partition's threads stop with its stream
            if pool is not None:
                pool.shutdown(wait=True)

    def _next(self, p: int, stream: Iterator, acked: int = -1) -> tuple[int, list[Plan]]:
        if acked >= 0:
            self.parts[p].note_writebacks_applied(acked)
        try:
            item = next(stream, None)
        except CapacityError as exc:
            raise self._capacity_error(p, exc) from None
        if item is None:
            raise AssertionError(f"partition {p} stopped early (internal error)")
        return item

    def _capacity_error(self, p: int, exc: CapacityError) -> CapacityError:
        smallest = self.min_cache_rows()
        return CapacityError(partition_capacity_message(self.cfg.cache_rows, self.k, p, self.shares[p], exc.trainer,
                                                        exc.need, exc.iteration, smallest),
                             exc.trainer, exc.need, exc.iteration)

    def _most_per_partition(self) -> list[int]:
        """The most distinct rows one trainer reads of each partition in one iteration, over the run."""
        tables = getattr(self.batches, "column_tables", None)
        most = np.zeros(self.k, np.int64)
        for i in range(self.iterations):
            rows = np.asarray(self.batches[i], dtype=np.int64)
            most = np.maximum(most, distinct_rows_per_partition(rows, self.n, self.k, tables).max(axis=0))
        return most.tolist()

    # ---------------------------------------------------------- merging
    def _slots(self, p: int, slots: np.ndarray) -> np.ndarray:
        """Partition p's slots as the trainer's: in its share, or interleaved for an unbounded policy.

        A partition's scratch slots (its share and beyond) interleave past the cache: scratch slot j
        of partition p is the trainer's slot ``cache_rows + j K + p``.
        """
        slots = slots.astype(np.int64)
        if self.bounded:
            share = self.shares[p]
            return np.where(slots < share, slots + self.bases[p],
                            self.cfg.cache_rows + (slots - share) * self.k + p).astype(np.int32)
        return (slots * self.k + p).astype(np.int32)

    def _slots_needed(self, needed: list[int]) -> int:
        """Slots the trainer's cache must have for partitions that have handed out ``needed[p]`` each."""
        if self.bounded:
            return max((self.bases[p] + n if n <= self.shares[p]
                        else self.cfg.cache_rows + (n - self.shares[p] - 1) * self.k + p + 1
                        for p, n in enumerate(needed) if n > 0), default=0)
        return max(((n - 1) * self.k + p + 1 for p, n in enumerate(needed) if n > 0), default=0)

    def _merge(self, k: int, per_partition: list[list[Plan]]) -> list[Plan]:
        """One plan per trainer from the partitions' on-demand plans of iteration k, in partition order."""
        merged = []
        for t in range(self.n):
            ps = [plans[t] for plans in per_partition]
            read = np.full(ps[0].read_slots.shape, -1, np.int32)
            unread = 0
            install_ids, install_slots, sync_pos, sync_slots = [], [], [], []
            join_pos, join_slots = [], []
            first = self._next_fetch[t]
            fetched = n_sync = n_join = 0
            for p, plan in enumerate(ps):
                unread = _place_reads(read, plan.read_slots, p, self.bases[p], self.shares[p], self.cfg.cache_rows,
                                      self.k, self.bounded)
                # On demand a plan installs exactly the fetches it issues, numbered from its first fetch id.
                local = plan.install_ids - plan.first_fetch_id
                if len(local) != len(plan.fetch_keys) or (len(local) and (local.min() < 0 or
                                                                          local.max() >= len(plan.fetch_keys))):
                    raise AssertionError(f"partition {p} plan {k} trainer {t} installs other rows than it fetches "
                                         "(internal error)")
                install_ids.append(local + first + fetched)
                install_slots.append(self._slots(p, plan.install_slots))
                sync_pos.append(plan.sync_pos + n_sync)
                sync_slots.append(self._slots(p, plan.sync_slots))
                join_pos.append(plan.join_pos + n_join)
                join_slots.append(self._slots(p, plan.join_slots))
                fetched += len(plan.fetch_keys)
                n_sync += plan.n_sync
                n_join += plan.n_join
            if unread:
                raise AssertionError(f"plan {k} trainer {t}: a cell no partition reads (internal error)")
            self._next_fetch[t] = first + fetched
            plan = Plan(
                iteration=k, rank=t, read_slots=read,
                fetch_keys=np.concatenate([p.fetch_keys for p in ps]),
                fetch_versions=np.concatenate([p.fetch_versions for p in ps]),
                install_ids=np.concatenate(install_ids).astype(np.int64),
                install_slots=np.concatenate(install_slots).astype(np.int32),
                sync_pos=np.concatenate(sync_pos).astype(np.int32),
                sync_slots=np.concatenate(sync_slots).astype(np.int32),
                join_pos=np.concatenate(join_pos).astype(np.int32),
                join_slots=np.concatenate(join_slots).astype(np.int32),
                join_send=np.concatenate([p.join_send for p in ps]).astype(np.uint8),
                evict_slots=np.concatenate([self._slots(p, pl.evict_slots) for p, pl in enumerate(ps)]),
                evict_keys=np.concatenate([p.evict_keys for p in ps]).astype(np.int64),
                evict_write=np.concatenate([p.evict_write for p in ps]).astype(np.uint8),
                n_sync=n_sync, n_join=n_join, first_fetch_id=first,
                slots_needed=self._slots_needed([p.slots_needed for p in ps]))
            self._count(t, plan)
            merged.append(plan)
        return merged

    def _count(self, t: int, plan: Plan) -> None:
        """The trainer's stats, counted from its merged plans as the planners count them."""
        s = self.stats[t]
        joined = plan.join_send == 0
        s.rows_fetched += len(plan.fetch_keys)
        s.rows_joined += int(np.count_nonzero(joined))
        s.rows_synced += len(plan.sync_slots)
        s.rows_written_back += int(np.count_nonzero(plan.evict_write))
        # The new rows: installed, or joined; those in scratch slots (past cache_rows) are bypassed.
        # (An unbounded policy's slots interleave past cache_rows, and it never bypasses.)
        cap = self.cfg.cache_rows if self.bounded else np.iinfo(np.int32).max
        scratch = int(np.count_nonzero(plan.install_slots >= cap) + np.count_nonzero(plan.join_slots[joined] >= cap))
        s.rows_bypassed += scratch
        s.peak_scratch_rows = max(s.peak_scratch_rows, scratch)
        # Resident once this iteration's new rows are in; the evictions after it leave before the next.
        self._resident[t] += len(plan.fetch_keys) + int(np.count_nonzero(joined)) - scratch
        s.peak_resident_rows = max(s.peak_resident_rows, self._resident[t])
        self._resident[t] -= int(np.count_nonzero(plan.evict_slots < cap))
