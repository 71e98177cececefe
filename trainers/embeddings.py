"""Where a trainer's embedding rows live: every row in memory (``local``) or a planned cache.

``Trainer`` and ``Step`` never ask which policy runs: they talk to an
``Embeddings``. Both implementations hold rows in a ``SlotCache`` and read
them by slot, so the arithmetic of a step is the same bit for bit; they
differ in where plans come from and what happens around the step:

* ``LocalEmbeddings``: every row of every table has a slot (table offset +
  row); plans are made here from the batch (``LocalPlans``), nothing is
  fetched or written back, and the rows updated are remembered so a
  checkpoint or an export holds exactly the rows training touched.
* ``CachedEmbeddings``: the oracle's plans arrive over ZeroMQ
  (``PlanClient``); before the step the rows they install are taken from the
  store traffic (``StoreIO``, which fetched them ahead), after it evicted rows
  are handed back to be written, and a credit goes to the oracle.
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import torch

from bagpipe.config import CacheConfig
from bagpipe.keys import ROW_BITS, initial_rows, key_row, key_table, plan_keys, trainer_keys
from bagpipe.wire import Plan
from trainers.cache import RowInstaller, SlotCache

_CHUNK = 1 << 18  # rows per chunk when streaming every touched row out


class Embeddings:
    """The interface (see the module docstring); ``cache`` holds the rows a step reads."""

    cache: SlotCache
    fetches: bool = False  # rows come from a store (hit rates and stalls mean something)

    def next_plan(self, iteration: int) -> Plan:
        raise NotImplementedError

    def install(self, plan: Plan) -> float:
        """Put the rows this plan installs into their slots; returns the seconds spent waiting for them."""
        return 0.0

    def updated(self, slots: torch.Tensor) -> None:
        """The optimizer just stepped the rows in ``slots``."""

    def after_step(self, iteration: int, plan: Plan) -> int:
        """Evict what the plan evicts (handing write-backs over), acknowledge the iteration;
        returns the rows handed over for writing."""
        return 0

    def flush(self) -> None:
        """Block until every row handed over has reached the store."""

    def rows_for(self, keys: np.ndarray) -> np.ndarray:
        """Current values of rows (embedding and state); only between segments for a cache."""
        raise NotImplementedError

    def touched_rows(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every row that differs from its initial value, in chunks of (keys, values)."""
        raise NotImplementedError

    def restore(self, chunks: Iterator[tuple[np.ndarray, np.ndarray]]) -> None:
        """Take a checkpoint's rows (a cache restores from the store, which the job refilled)."""

    def error(self, message: str) -> None:
        """Tell whoever plans for us that this trainer stops."""

    def close(self) -> None:
        pass


class LocalPlans:
    """Policy ``local``'s plans: every row lives in the trainer (slot = table offset + row)."""

    def __init__(self, offsets: np.ndarray, sparse, rank: int, world: int,
                 column_tables: np.ndarray | None = None) -> None:
        self.offsets, self.sparse, self.rank, self.world = offsets, sparse, rank, world
        self.column_tables = column_tables  # multi-hot: each column's table (None: column t is table t)

    def slots(self, keys: np.ndarray) -> np.ndarray:
        return (self.offsets[key_table(keys)] + key_row(keys)).astype(np.int32)

    def next_plan(self, iteration: int) -> Plan:
        keys = plan_keys(self.sparse[iteration], self.column_tables, self.world)
        mine = trainer_keys(keys, self.rank, self.world)
        if self.world == 1:
            return Plan.of(iteration, self.rank, read_slots=self.slots(mine))
        # Every trainer holds every row: all rows used by anyone are synced.
        used = np.unique(keys)
        return Plan.of(iteration, self.rank, read_slots=self.slots(mine), sync_pos=np.arange(len(used), dtype=np.int32),
                       sync_slots=self.slots(used), n_sync=len(used))


class LocalEmbeddings(Embeddings):
    """Every row of every table in one ``SlotCache`` (policy ``local``)."""

    def __init__(self, table_sizes: np.ndarray, cfg: CacheConfig, dim: int, seed: int, device: torch.device,
                 sparse, rank: int, world: int, column_tables: np.ndarray | None = None) -> None:
        self.table_sizes = np.asarray(table_sizes, np.int64)
        self.dim, self.state_width, self.device = dim, cfg.state_width, device
        self.offsets = np.concatenate([[0], np.cumsum(self.table_sizes)[:-1]]).astype(np.int64)
        total = int(self.table_sizes.sum())
        self.cache = SlotCache(total, dim, cfg.state_width, device, cfg.optimizer, cfg.lr, cfg.eps)
        # On the device, so marking the rows a step updated costs no wait for that step (a copy to the
        # host would make the CPU wait for the optimizer's kernels every iteration).
        self.touched = torch.zeros(total, dtype=torch.bool, device=device)
        self.plans = LocalPlans(self.offsets, sparse, rank, world, column_tables)
        for t, n in enumerate(self.table_sizes.tolist()):
            for lo in range(0, n, 1 << 20):
                keys = (np.int64(t) << ROW_BITS) | np.arange(lo, min(n, lo + (1 << 20)), dtype=np.int64)
                vals = initial_rows(keys, dim, cfg.state_width, seed, self.table_sizes)
                at = int(self.offsets[t]) + lo
                self.cache.rows[at:at + len(keys)] = torch.from_numpy(vals).to(device)

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        return self.offsets[key_table(keys)] + key_row(keys)

    def next_plan(self, iteration: int) -> Plan:
        return self.plans.next_plan(iteration)

    def updated(self, slots: torch.Tensor) -> None:
        # Every row updated here, including rows only other ranks read (synced).
        self.touched[slots] = True

    def rows_for(self, keys: np.ndarray) -> np.ndarray:
        slots = torch.from_numpy(self._slots(keys))
        return self.cache.rows[slots.to(self.device)].cpu().numpy()

    def touched_rows(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        idx = torch.nonzero(self.touched).squeeze(1).cpu().numpy()
        for lo in range(0, len(idx), _CHUNK):
            part = idx[lo:lo + _CHUNK]
            table = np.searchsorted(self.offsets, part, side="right") - 1
            keys = (table.astype(np.int64) << ROW_BITS) | (part - self.offsets[table])
            yield keys, self.cache.rows[torch.from_numpy(part).to(self.device)].cpu().numpy()

    def restore(self, chunks: Iterator[tuple[np.ndarray, np.ndarray]]) -> None:
        for keys, values in chunks:
            slots = torch.from_numpy(self._slots(keys)).to(self.device)
            self.cache.write(slots, torch.from_numpy(values).to(self.device))
            self.touched[slots] = True


class CachedEmbeddings(Embeddings):
    """The oracle's plans over a bounded ``SlotCache``; rows fetched ahead and written back by ``io``.

    ``client`` delivers plans and takes credits (``trainers.plans.PlanClient``);
    ``io`` carries the store traffic (``trainers.storeio.StoreIO``) and ``store``
    answers reads between segments (evaluation, checkpoints, export).
    """

    fetches = True

    def __init__(self, cfg: CacheConfig, bounded: bool, dim: int, device: torch.device, store, io, client,
                 bypass: bool = False) -> None:
        self.device, self.store, self.io, self.client = device, store, io, client
        # Sized by the plans (``slots_needed``): the oracle holds the cache to cache_rows where the
        # policy is bounded, and says how many slots an unbounded policy needs as it goes. With bypass
        # the scratch area follows the cache's slots: it holds rows of one iteration only, which are
        # never more than cache_rows (the oracle refuses a smaller cache), so it never needs more.
        limit = (2 * cfg.cache_rows if bypass else cfg.cache_rows) if bounded else None
        self.cache = SlotCache(0, dim, cfg.state_width, device, cfg.optimizer, cfg.lr, cfg.eps, limit=limit)
        self.installer = RowInstaller(device)  # on CUDA: pinned memory, a side stream (trainers.cache)

    def next_plan(self, iteration: int) -> Plan:
        return self.client.next_plan(iteration)

    def install(self, plan: Plan) -> float:
        self.cache.ensure_slots(plan.slots_needed)
        self.io.fetch(plan.first_fetch_id, plan.fetch_keys, plan.fetch_versions)
        t0 = time.perf_counter()
        rows = self.io.take(plan.install_ids)
        stall = time.perf_counter() - t0
        self.installer(self.cache, plan.install_slots, rows)
        return stall

    def after_step(self, iteration: int, plan: Plan) -> int:
        write = plan.evict_write.astype(bool)
        written = int(write.sum())
        if written:
            slots = torch.from_numpy(plan.evict_slots[write].astype(np.int64)).to(self.device)
            values = self.cache.read(slots).cpu().numpy()
            self.io.write_back(plan.evict_keys[write], values, iteration)
        self.io.mark_iteration(iteration)
        self.client.credit(iteration, self.io.written_through)
        return written

    def flush(self) -> None:
        self.io.drain()

    def rows_for(self, keys: np.ndarray) -> np.ndarray:
        values, _ = self.store.get(keys)
        return values

    def touched_rows(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield from self.store.scan_rows()

    def error(self, message: str) -> None:
        self.client.error(message)

    def close(self) -> None:
        for part in (self.io, self.client, self.store):
            if part is not None:
                part.close()
