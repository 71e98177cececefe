"""The Oracle Cacher's planner: a pure core with no sockets, I/O or Redis.

Given the sequence of global batches (sparse ids only), it decides for every
iteration and every trainer which rows to fetch into which cache slots,
which to evict and who writes them back, where every read finds its row, and
which rows' gradients are combined across trainers. ``oracle.process`` ships
these plans over ZeroMQ; ``oracle.simulate`` runs the same code offline.

The rules (episodes, joins, syncs, versions, capacity, the policies) are
stated, in plain Python, by ``oracle.reference``; read its docstring. This
module computes exactly the same plans, array for array, with the per-row
work in compiled kernels (``oracle.fastplan``) over numpy state whose size
follows the window and the cache, never the tables. Python here only checks
the batches, grows the state between kernel calls, runs the per-trainer
kernels in a small thread pool (one thread per trainer, up to the cores;
the kernels release the GIL), and slices the kernels' arrays into each
plan's fields (``oracle.shell`` builds the plans). Its results do not
depend on the threads: each per-trainer kernel writes only its trainer's
state.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable

import numpy as np

from oracle import fastplan as fp
from oracle.fastplan.state import Episodes, Queues, Rows, StepBuffers, Window
from bagpipe.config import capacity_message
from bagpipe.keys import source_keys
from oracle.planner_types import INF, BatchSource, CapacityError, PlanError, PlannerConfig, PlanStats
from oracle.shell import PlannerShell

__all__ = ["INF", "BatchSource", "CapacityError", "PlanError", "Planner", "PlannerConfig", "PlanStats",
           "pinned_rows"]

# The kernels' counters (fetches_deferred and peak_staged_rows are oracle.staging's).
_STAT_FIELDS = ("rows_fetched", "rows_joined", "rows_written_back", "rows_synced", "peak_resident_rows",
                "rows_bypassed", "peak_scratch_rows")


def _pow2(n: int) -> int:
    c = 16
    while c < n:
        c *= 2
    return c


def _grown(arr: np.ndarray, axis: int, size: int, fill: int | None = None) -> np.ndarray:
    """``arr`` with its ``axis`` extended to ``size`` (new cells set to ``fill`` when given)."""
    shape = list(arr.shape)
    old = shape[axis]
    shape[axis] = size
    out = np.empty(shape, arr.dtype) if fill is None else np.full(shape, fill, arr.dtype)
    index = [slice(None)] * arr.ndim
    index[axis] = slice(0, old)
    out[tuple(index)] = arr
    return out


def _index_size(count: int, incoming: int, cap: int) -> int:
    """Cells a hash index needs: never full while ``incoming`` keys may arrive, and at most half full.

    Every cell is as likely to be touched as any other, so an index much
    larger than its keys only spreads them over more cache lines.
    """
    if count + incoming <= 0.9 * cap and count <= 0.5 * cap:
        return cap
    return _pow2(max(int((count + incoming) / 0.85) + 1, 2 * count + 2))


def _index(cap: int) -> np.ndarray:
    """An empty hash index of ``cap`` cells (key, value + 1): all zeros."""
    return np.zeros((cap, 2), np.int64)


def _entries(n: int, cap: int, old: np.ndarray | None = None) -> np.ndarray:
    """Row entries [n, cap, 8] int64: 64-byte records, each on one cache line (copying ``old``)."""
    flat = np.zeros(n * cap * 8 + 8, np.int64)
    skip = (-flat.ctypes.data % 64) // 8
    out = flat[skip:skip + n * cap * 8].reshape(n, cap, 8)
    if old is not None:
        out[:, :old.shape[1]] = old
    return out


def _records(count: int, width: int, old: np.ndarray | None = None) -> np.ndarray:
    """Zeroed records [count, width] int64 starting on a cache line (copying ``old``): with
    8 fields, each record is one cache line."""
    flat = np.zeros(count * width + 8, np.int64)
    skip = (-flat.ctypes.data % 64) // 8
    out = flat[skip:skip + count * width].reshape(count, width)
    if old is not None:
        out[:old.shape[0]] = old
    return out


class _State:
    """The planner's records (``oracle.fastplan.state`` says what each field holds), grown between kernel
    calls: a record is immutable, so growing an array replaces its field (``_replace``)."""

    def __init__(self, cfg: PlannerConfig, iterations: int, tables: int, pinned: list[np.ndarray] | None) -> None:
        n = cfg.trainers
        lb = cfg.batch_size // n
        u = lb * tables
        # Residency is planned on demand; oracle.staging moves the fetches ahead afterwards.
        r = cfg.horizon + 2  # the window: iterations k-1 .. k + horizon
        if r * max(u, 1) >= fp.INF32 or iterations + cfg.horizon >= fp.INF32:
            raise PlanError(f"a window of {r} iterations of {u} rows, or {iterations} iterations, is too large")
        nw = (n + 63) // 64
        gw = fp.G_MASKS + 2 * nw + n
        rules = cfg.rules
        self.C = np.array([rules.code, cfg.cache_rows, cfg.horizon, n, u, r, iterations,
                           int(rules.bounded), tables, lb, nw, gw, int(cfg.bypasses)], np.int64)
        assert len(self.C) == fp.C_LEN
        self.n, self.u, self.r = n, u, r
        pinned = pinned or [np.zeros(0, np.int64)] * n
        pinned_keys = np.zeros((n, max(1, max(len(p) for p in pinned))), np.int64)
        for t, p in enumerate(pinned):
            pinned_keys[t, :len(p)] = p
        # Room for about four iterations' rows from the start (the window holds up to r, sharing hot rows).
        ecap = _pow2(4 * u + 64)
        entries = _entries(n, ecap)
        self.rows = Rows(
            entries=entries, entries32=entries.view(np.int32), free_entries=np.zeros((n, ecap), np.int32),
            index=np.zeros((n, _pow2(ecap), 2), np.int64), counters=np.zeros((n, fp.M_LEN), np.int64),
            free_slots=np.zeros((n, 1024), np.int64), stats=np.zeros((n, fp.S_LEN), np.int64),
            pinned_keys=pinned_keys, pinned_count=np.array([len(p) for p in pinned], np.int64),
            distinct=np.zeros(n, np.int64))
        self.window = Window(rows=np.zeros((n, r * u), np.int32), counts=np.zeros((n, r), np.int64),
                             reads=np.zeros((n, r * u), np.int32), next_use=np.zeros((n, r * u), np.int32))
        nlists = fp.NCLASS + (r if rules.code == fp.P_BAGPIPE else 0)
        self.queues = Queues(nodes=np.zeros((n, 1024, 3), np.int64), lists=np.full((n, nlists, 3), -1, np.int64),
                             bucket_rows=np.zeros((n, r + 1), np.int64), heap=np.zeros((n, 64, 5), np.int64),
                             heap_sizes=np.zeros(n, np.int64))
        self.episodes = Episodes(records=_records(512, gw), index=_index(1024), free=np.zeros(512, np.int64),
                                 counters=np.zeros(fp.GM_LEN, np.int64), versions=_index(1024),
                                 written=np.zeros((1024, 2), np.int64))
        self.buffers = StepBuffers(
            load=np.zeros((n, 6, u), np.int64), evictions=np.zeros((n, 0, 4), np.int64),
            new_rows=np.zeros((n, 0, 3), np.int64), counts=np.zeros((n, 3), np.int64),
            all_evictions=np.zeros((0, 4), np.int64), all_new_rows=np.zeros((0, 3), np.int64),
            new_offsets=np.zeros(n + 1, np.int64), joins=np.zeros((0, 4), np.int64),
            installs=np.zeros((0, 3), np.int64))

    # ------------------------------------------------------------ growth
    def before_load(self) -> None:
        """Room for one more iteration in the window: u new entries and queue nodes per trainer."""
        u, rows = self.u, self.rows
        count = int(rows.counters[:, fp.M_ECOUNT].max())
        if count + u > rows.entries.shape[1]:
            cap = _pow2(2 * (count + u))
            entries = _entries(self.n, cap, rows.entries)
            rows = self.rows = rows._replace(entries=entries, entries32=entries.view(np.int32),
                                             free_entries=_grown(rows.free_entries, 1, cap))
        cap = _index_size(count, u, rows.index.shape[1])
        if cap != rows.index.shape[1]:
            new = np.zeros((self.n, cap, 2), np.int64)
            for t in range(self.n):
                fp.rehash(rows.index[t], new[t])
            self.rows = rows._replace(index=new)
        if self.C[fp.C_POLICY] == fp.P_BAGPIPE:
            self._nodes(u)

    def before_step(self, k: int) -> None:
        """Room for step k: scratch for its records, slots, queue nodes, heap entries, episodes, versions."""
        c, r, b = self.C, self.r, self.buffers
        counts = self.window.counts
        acq = counts[:, k % r]  # at most every row read at k is new
        drops = counts[:, (k - 1) % r] if k > 0 else np.zeros(self.n, np.int64)
        fetched, dropped = int(acq.sum()), int(drops.sum())
        reads = int(counts[:, k % r].sum())
        each = int((acq + drops).max())
        if b.evictions.shape[1] < each:
            b = b._replace(evictions=np.zeros((self.n, _pow2(each), 4), np.int64))
        if b.new_rows.shape[1] < int(acq.max()):
            b = b._replace(new_rows=np.zeros((self.n, _pow2(int(acq.max())), 3), np.int64))
        if b.all_evictions.shape[0] < fetched + dropped:
            b = b._replace(all_evictions=np.zeros((_pow2(fetched + dropped), 4), np.int64))
        if b.all_new_rows.shape[0] < fetched:
            b = b._replace(all_new_rows=np.zeros((_pow2(fetched), 3), np.int64),
                           joins=np.zeros((_pow2(2 * fetched), 4), np.int64))
        if b.installs.shape[0] < self.n * reads:
            b = b._replace(installs=np.zeros((_pow2(self.n * reads), 3), np.int64))
        self.buffers = b
        need_slots = int((self.rows.counters[:, fp.M_NEXTSLOT] + acq).max())
        if need_slots > self.rows.free_slots.shape[1]:
            self.rows = self.rows._replace(free_slots=_grown(self.rows.free_slots, 1, _pow2(2 * need_slots)))
        if c[fp.C_POLICY] in (fp.P_BAGPIPE, fp.P_LRU, fp.P_LRU_PREFETCH, fp.P_LFU):
            self._nodes(int(drops.max()))  # every row used at k-1 is queued again
            self._heap(int(self.rows.counters[:, fp.M_HOT].max()))
        self._global(fetched, fetched + dropped)

    def before_flush(self) -> None:
        """Room for the versions of the final write-backs."""
        m = self.rows.counters
        self._global(0, int((m[:, fp.M_RES] + m[:, fp.M_NSCR]).sum()))

    def _nodes(self, need: int) -> None:
        """Room for ``need`` new queue nodes per trainer past the last one handed out."""
        nodes = self.queues.nodes
        if nodes.shape[1] - int(self.rows.counters[:, fp.M_NHWM].max()) >= need:
            return
        fp.compact_nodes(self.rows, self.queues)
        live = int(self.rows.counters[:, fp.M_NHWM].max())  # after compaction, the live nodes
        if nodes.shape[1] - live < 2 * need or live > nodes.shape[1] // 2:
            self.queues = self.queues._replace(nodes=_grown(nodes, 1, _pow2(2 * (live + 2 * need))))

    def _heap(self, need: int) -> None:
        q = self.queues
        if int(q.heap_sizes.max()) + need <= q.heap.shape[1]:
            return
        fp.compact_heaps(self.rows, q)
        size = int(q.heap_sizes.max())
        if size + need > q.heap.shape[1] // 2:
            self.queues = q._replace(heap=_grown(q.heap, 1, _pow2(2 * (size + need))))

    def _global(self, episodes: int, writebacks: int) -> None:
        g = self.episodes
        gm = g.counters
        count = int(gm[fp.GM_COUNT])
        if count + episodes > g.records.shape[0]:
            cap = _pow2(2 * (count + episodes))
            g = g._replace(records=_records(cap, g.records.shape[1], g.records), free=_grown(g.free, 0, cap))
        cap = _index_size(count, episodes, g.index.shape[0])
        if cap != g.index.shape[0]:
            new = _index(cap)
            fp.rehash(g.index, new)
            g = g._replace(index=new)
        wb = int(gm[fp.GM_WB_COUNT])
        cap = _index_size(wb, writebacks, g.versions.shape[0])
        if cap != g.versions.shape[0]:
            new = _index(cap)
            fp.rehash(g.versions, new)
            g = g._replace(versions=new)
        head, tail = int(gm[fp.GM_WQ_HEAD]), int(gm[fp.GM_WQ_TAIL])
        if tail + writebacks > g.written.shape[0]:
            live = tail - head
            cap = g.written.shape[0]
            if live + writebacks > cap // 2:
                cap = _pow2(2 * (live + writebacks))
            written = np.zeros((cap, 2), np.int64)
            written[:live] = g.written[head:tail]
            g = g._replace(written=written)
            gm[fp.GM_WQ_HEAD], gm[fp.GM_WQ_TAIL] = 0, live
        self.episodes = g

    def rows_tracked(self) -> int:
        """Rows the state tracks now: per-trainer entries, episodes and unacknowledged write-backs."""
        gm = self.episodes.counters
        return int(self.rows.counters[:, fp.M_ECOUNT].sum() + gm[fp.GM_COUNT] + gm[fp.GM_WB_COUNT])

    def nbytes(self) -> int:
        """Bytes of every array (``entries32`` is a view of ``entries``)."""
        arrays = [self.C, *self.window, *self.queues, *self.episodes, *self.buffers,
                  *(a for name, a in self.rows._asdict().items() if name != "entries32")]
        return sum(a.nbytes for a in arrays)


class Planner(PlannerShell):
    """Plans iterations 0..iterations-1 for every trainer; see the module docstring, and
    ``oracle.shell`` for the loop.

    Use ``plans()`` for the stream of ``(iteration, [Plan per trainer])``.
    The planner keeps only the window [current, current + horizon] of
    batches and hash tables of the rows resident or in the window: its memory
    grows with the window and the cache, never with table size.
    """

    def __init__(self, cfg: PlannerConfig, batches: BatchSource, pinned: list[set[int]] | None = None,
                 workers: int | None = None) -> None:
        # Threads for the per-trainer kernels and the next batch's loading (default: one per trainer, up to
        # the cores); 0 runs them in the caller's thread, one after another.
        cores = os.cpu_count() or 1
        self.workers = (min(cfg.trainers, cores) if cores > 1 else 0) if workers is None else max(0, workers)
        super().__init__(cfg, batches)
        cfg = self.cfg  # with the horizon resolved
        self._pinned: list[np.ndarray] | None = None
        if cfg.rules.pins:
            if pinned is None:
                pinned = pinned_rows(cfg, batches)
            self._pinned = [np.array(sorted(p), np.int64) for p in pinned]
        self._state: _State | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._loading: list[Future] = []  # the next batch, loading while the current one is planned
        self._loaded = 0  # iterations [0, loaded) have entered the window
        # Between a step and its plan: whether the next batch is loading, and a loading error, raised
        # at the next step (where the reference, which loads there, raises it).
        self._next_loading = False
        self._load_failed: PlanError | None = None

    # ------------------------------------------------------------- window
    def _rows(self, i: int) -> np.ndarray:
        """Batch i's keys [batch, columns] (``bagpipe.keys.plan_keys``: bags' pads stand in for a real key)."""
        rows = np.asarray(self.batches[i])
        if rows.ndim != 2:
            raise PlanError(f"batch {i} has shape {rows.shape}, expected [batch_size, tables]")
        if rows.shape[0] != self.cfg.batch_size:
            raise PlanError(f"batch {i} has {rows.shape[0]} rows, expected batch_size {self.cfg.batch_size}")
        try:
            return np.ascontiguousarray(source_keys(self.batches, i, self.n), dtype=np.int64)
        except ValueError as exc:
            raise PlanError(f"batch {i}: {exc}") from None

    def _load(self, upto: int) -> None:
        """Bring iterations [loaded, upto] into the window."""
        while self._loaded <= min(upto, self.iterations - 1):
            self._end_load(self._start_load())

    def _start_load(self) -> list[Future]:
        """Check batch ``loaded``, make room for it, and start loading it into every trainer's window."""
        i = self._loaded
        keys = self._rows(i)
        s = self._state
        if s is None:
            s = self._state = _State(self.cfg, self.iterations, keys.shape[1], self._pinned)
        elif keys.shape[1] != int(s.C[fp.C_T]):
            raise PlanError(f"batch {i} has {keys.shape[1]} tables, batch 0 has {int(s.C[fp.C_T])}")
        s.before_load()
        # The records as they are now: the next growth waits for these jobs (_end_load).
        rows, window, queues, buffers = s.rows, s.window, s.queues, s.buffers
        return self._each_trainer(lambda t: fp.load(s.C, i, t, keys, rows, window, queues, buffers), wait=False)

    def _end_load(self, jobs: list[Future]) -> None:
        for job in jobs:
            job.result()
        self._loading = []
        i, s = self._loaded, self._state
        if self.cfg.rules.bounded:
            for t in range(self.n):
                distinct = int(s.rows.distinct[t])
                if distinct > self.cfg.cache_rows:
                    raise CapacityError(capacity_message(self.cfg.cache_rows, t, distinct, i, self.min_cache_rows()),
                                        t, distinct, i)
        self._loaded += 1

    def _forget_writebacks(self, through_iteration: int) -> None:
        if self._state is not None:
            s = self._state
            fp.forget_writebacks(through_iteration, s.episodes)

    def state_rows(self) -> int:
        """Rows the planner tracks now (resident, in the window, in an episode, or with a write-back in flight)."""
        self._settle()
        return 0 if self._state is None else self._state.rows_tracked()

    def state_nbytes(self) -> int:
        """Bytes of the planner's arrays."""
        self._settle()
        return 0 if self._state is None else self._state.nbytes()

    def _settle(self) -> None:
        """Wait for the batch loading in the background (its errors surface where the reference raises them)."""
        for job in self._loading:
            job.exception()

    # ------------------------------------------------------------- planning (oracle.shell runs the loop)
    @contextmanager
    def _running(self):
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="planner") if self.workers else None
        try:
            yield
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _each_trainer(self, fn: Callable[[int], None], wait: bool = True) -> list[Future]:
        """Run ``fn(t)`` for every trainer: in the pool's threads when there are cores (the kernels release
        the GIL), else here. With ``wait=False`` return the running jobs."""
        if self._pool is None:
            for t in range(self.n):
                fn(t)
            return []
        jobs = [self._pool.submit(fn, t) for t in range(self.n)]
        if wait:
            for job in jobs:
                job.result()
        return jobs

    def _step(self, k: int) -> tuple:
        if self._load_failed is not None:
            raise self._load_failed
        ahead = self.cfg.horizon
        self._load(k + ahead)
        s = self._state
        s.before_step(k)
        self._each_trainer(lambda t: fp.advance(s.C, t, k, s.rows, s.window, s.queues, s.episodes, s.buffers))
        # The next step's batch loads while this step plans: loading touches only the trainers'
        # windows (fields of the rows that planning does not write), planning only the rest.
        jobs: list[Future] = []
        self._next_loading = self._loaded == k + ahead + 1 < self.iterations
        if self._next_loading:
            try:
                jobs = self._loading = self._start_load()
            except PlanError as exc:
                self._load_failed, self._next_loading = exc, False
        out = fp.finish_step(s.C, k, s.rows, s.episodes, s.buffers)
        err, err_t = out[0], out[1]
        if err != fp.ERR_OK:
            for job in jobs:
                job.result()
        if err == fp.ERR_NO_ROOM:
            raise PlanError(f"trainer {err_t} found no room for iteration {k}'s rows (internal error)")
        if err != fp.ERR_OK:
            raise PlanError(f"trainer {err_t}: planner state is inconsistent at iteration {k} (internal error)")
        self._sync_stats()
        return out[2:]

    def _attach(self, evictions: tuple, after: int) -> list[dict]:
        # The kernels settled the writers already (finish_step, flush).
        ev_key, ev_slot, ev_write, ev_off = evictions
        return [dict(evict_slots=ev_slot[a:b], evict_keys=ev_key[a:b], evict_write=ev_write[a:b])
                for a, b in zip(ev_off[:-1], ev_off[1:])]

    def _plan(self, k: int) -> list[dict]:
        s = self._state
        planned = fp.plan_iteration(s.C, k, s.rows, s.window, s.episodes, s.buffers)
        if self._next_loading:
            try:
                self._end_load(self._loading)
            except PlanError as exc:
                self._load_failed = exc
        self._sync_stats()
        return self._assemble(k, planned)

    def _flush(self, after: int) -> tuple:
        s = self._state
        s.before_flush()
        out = fp.flush(s.C, after, s.rows, s.queues, s.episodes)
        self._sync_stats()
        return out

    def _sync_stats(self) -> None:
        st = self._state.rows.stats
        for t, s in enumerate(self.stats):
            for c, name in enumerate(_STAT_FIELDS):
                if name is not None:
                    setattr(s, name, int(st[t, c]))

    def _assemble(self, k: int, out: tuple) -> list[dict]:
        (read, f_key, f_ver, f_off, first_fid, in_id, in_slot, in_off,
         sy_pos, sy_slot, sy_off, n_sync, jo_pos, jo_slot, jo_send, jo_off, n_join, slots_needed) = out
        planned = []
        for t in range(self.n):
            a, b = f_off[t], f_off[t + 1]
            c, d = in_off[t], in_off[t + 1]
            e, f = sy_off[t], sy_off[t + 1]
            g, h = jo_off[t], jo_off[t + 1]
            planned.append(dict(
                read_slots=read[t], fetch_keys=f_key[a:b], fetch_versions=f_ver[a:b],
                install_ids=in_id[c:d], install_slots=in_slot[c:d], sync_pos=sy_pos[e:f], sync_slots=sy_slot[e:f],
                join_pos=jo_pos[g:h], join_slots=jo_slot[g:h], join_send=jo_send[g:h],
                n_sync=int(n_sync), n_join=int(n_join), first_fetch_id=int(first_fid[t]),
                slots_needed=int(slots_needed[t])))
        return planned


def pinned_rows(cfg: PlannerConfig, batches: BatchSource) -> list[set[int]]:
    """The ``static`` policy's pinned rows: each trainer's most frequent rows, counted in one pass.

    The pinned set leaves room in the cache for one iteration's other rows
    (a per-batch scratch area), so the capacity bound still holds. Same sets
    as ``oracle.reference.pinned_rows``: count = iterations a row is read in,
    ties broken by the smaller key.
    """
    local_b = cfg.batch_size // cfg.trainers
    iterations = min(cfg.iterations, len(batches))
    seen: list[list[np.ndarray]] = [[] for _ in range(cfg.trainers)]
    per_iter_max = [0] * cfg.trainers
    for i in range(iterations):
        rows = np.ascontiguousarray(source_keys(batches, i, cfg.trainers), dtype=np.int64)
        for t in range(cfg.trainers):
            uniq = fp.distinct_keys(rows, t * local_b, local_b)
            uniq = uniq[np.searchsorted(uniq, 0):]  # absent cells (a partition's view) are no row
            per_iter_max[t] = max(per_iter_max[t], len(uniq))
            seen[t].append(uniq)
    pinned = []
    for t in range(cfg.trainers):
        room = cfg.cache_rows - per_iter_max[t]
        if room < 0:
            raise CapacityError(capacity_message(cfg.cache_rows, t, per_iter_max[t], None, max(per_iter_max)),
                                t, per_iter_max[t], None)
        keys, counts = np.unique(np.concatenate(seen[t]) if seen[t] else np.zeros(0, np.int64),
                                 return_counts=True)
        ranked = np.lexsort((keys, -counts))
        pinned.append(set(keys[ranked[:room]].tolist()))
    return pinned
