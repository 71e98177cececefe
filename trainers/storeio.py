"""The trainer's background store traffic: prefetches and write-backs, in issue order.

One worker thread runs the store operations in the order the trainer issued
them, so a trainer's own write-back always lands before any later fetch of
the same row. A fetch that depends on another trainer's write-back names
the version it needs; rows read with an older version are read again until
the version arrives or ``wait_timeout_s`` passes (then the job stops: it
never trains on a stale row).
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from bagpipe.store import EmbeddingStore


class StoreIOError(RuntimeError):
    pass


# A trainer waiting for rows gives the store side this long beyond its own timeout, so that when a
# row's version never comes, the error the job reports is the store side's (which row, which
# version), not the trainer's plainer "did not arrive".
TAKE_GRACE_S = 2.0


class _Block:
    """One plan's fetches, ids [start, start + n): their rows once arrived, and how many are still to be used."""

    __slots__ = ("start", "n", "values", "left")

    def __init__(self, start: int, n: int) -> None:
        self.start, self.n, self.left = start, n, n
        self.values: np.ndarray | None = None


class StoreIO:
    """Asynchronous fetches (by fetch id) and write-backs for one trainer.

    The worker's rules for write-backs and watermarks are methods
    (``_handle_put``, ``_handle_mark``, ``_tick``) so that ``trainers.mutants``
    can plant a fault or a bug by overriding one, chosen once at construction.
    """

    def __init__(self, store: EmbeddingStore, wait_timeout_s: float = 60.0) -> None:
        self.store = store
        self.wait_timeout_s = wait_timeout_s
        self._ops: deque = deque()
        self._cv = threading.Condition()
        # Fetched rows wait here, off the cache, until the plan installs them: one block per
        # plan's fetches (their ids are consecutive), so installing is a gather, not a loop per row.
        self._blocks: list[_Block] = []
        self._error: BaseException | None = None
        self._closed = False
        self.written_through = -1  # every write-back issued after iterations <= this has landed
        self._pending_writes = 0
        self.rows_fetched = 0
        self.rows_written = 0
        self.version_retries = 0
        self._thread = threading.Thread(target=self._run, name="store-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ trainer side
    def fetch(self, first_id: int, keys: np.ndarray, min_versions: np.ndarray) -> None:
        if len(keys):
            with self._cv:
                self._blocks.append(_Block(first_id, len(keys)))
            self._submit(("get", first_id, keys.copy(), min_versions.copy()))

    def write_back(self, keys: np.ndarray, values: np.ndarray, version: int) -> None:
        with self._cv:
            self._pending_writes += 1
        self._submit(("put", keys.copy(), values, version))

    def mark_iteration(self, iteration: int) -> None:
        """Everything issued so far belongs to iterations <= ``iteration``."""
        self._submit(("mark", iteration))

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Block until the rows of fetch ``ids`` have arrived; returns them stacked."""
        ids = np.asarray(ids, np.int64)
        out = np.empty((len(ids), self.store.width), np.float32)
        with self._cv:
            self._consume(ids, out, time.monotonic() + self.wait_timeout_s + TAKE_GRACE_S)
        return out

    def _consume(self, ids: np.ndarray, out: np.ndarray, deadline: float) -> None:
        """Hand the rows of ``ids`` to ``out``, waiting for them until ``deadline``."""
        found = 0
        for block in list(self._blocks):
            here = np.flatnonzero((ids >= block.start) & (ids < block.start + block.n))
            if not len(here):
                continue
            while block.values is None:
                self._raise_if_failed()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreIOError(f"fetches {block.start}..{block.start + block.n - 1} did not arrive "
                                       f"within {self.wait_timeout_s}s")
                self._cv.wait(min(left, 1.0))
            out[here] = block.values[ids[here] - block.start]
            found += len(here)
            block.left -= len(here)
            if block.left == 0:
                self._blocks.remove(block)
        if found != len(ids):
            raise StoreIOError(f"{len(ids) - found} of fetch ids {ids.tolist()[:8]}... were never issued or already used")

    def pop_ready(self, timeout_s: float) -> list[tuple[int, np.ndarray]]:
        """Hand over the fetched blocks that arrived, oldest first, as (first fetch id, rows): for a
        caller that forwards them elsewhere (the store agent) instead of ``take``-ing them. Waits up
        to ``timeout_s`` for the oldest one; raises the worker's error."""
        with self._cv:
            if not (self._blocks and self._blocks[0].values is not None):
                self._cv.wait(timeout_s)
            self._raise_if_failed()
            out = []
            while self._blocks and self._blocks[0].values is not None:
                block = self._blocks.pop(0)
                out.append((block.start, block.values))
            return out

    def drain(self) -> None:
        """Wait until every issued operation has run."""
        self._before_drain()
        deadline = time.monotonic() + max(self.wait_timeout_s, 60.0)
        with self._cv:
            while self._ops or self._pending_writes:
                self._raise_if_failed()
                if time.monotonic() > deadline:
                    raise StoreIOError("store operations did not finish in time")
                self._cv.wait(0.5)
            self._raise_if_failed()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=5)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StoreIOError(f"store traffic failed: {self._error}") from self._error

    def _submit(self, op: tuple) -> None:
        with self._cv:
            self._raise_if_failed()
            self._ops.append(op)
            self._cv.notify_all()

    # ------------------------------------------------------------- worker side
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._ops and not self._closed:
                        if self._cv.wait(self._poll_s()) is False and self._poll_s() is not None:
                            break  # a timed wake-up: let _tick run
                    if not self._ops and self._closed:
                        return
                    op = self._ops[0] if self._ops else None
                self._tick()
                if op is None:
                    continue
                kind = op[0]
                if kind == "get":
                    self._get(*op[1:])
                elif kind == "put":
                    self._handle_put(op)
                else:
                    self._handle_mark(op[1])
                with self._cv:
                    self._ops.popleft()
                    self._cv.notify_all()
        except BaseException as exc:  # handed to the trainer thread, which stops the job
            with self._cv:
                self._error = exc
                self._cv.notify_all()

    def _before_drain(self) -> None:
        """Called when the trainer starts waiting for everything issued."""

    def _poll_s(self) -> float | None:
        """How long the idle worker sleeps before ``_tick`` (None: until an operation comes)."""
        return None

    def _tick(self) -> None:
        """Called before each operation and on timed wake-ups."""

    def _handle_put(self, op: tuple) -> None:
        self._put(op)

    def _handle_mark(self, iteration: int) -> None:
        self.written_through = iteration

    def _put(self, op: tuple) -> None:
        _, keys, values, version = op
        self.store.put(keys, values, version)
        self.rows_written += len(keys)
        with self._cv:
            self._pending_writes -= 1

    def _get(self, first_id: int, keys: np.ndarray, min_versions: np.ndarray) -> None:
        values, versions = self.store.get(keys)
        deadline = time.monotonic() + self.wait_timeout_s
        stale = np.flatnonzero(versions < min_versions)
        delay = 0.001
        while len(stale):
            # Another trainer's write-back has not landed yet: read those rows again.
            if time.monotonic() > deadline:
                k = int(keys[stale[0]])
                raise StoreIOError(f"row key {k} still has version {int(versions[stale[0]])} < "
                                   f"{int(min_versions[stale[0]])} after {self.wait_timeout_s}s (write-back lost?)")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
            self._tick()
            self.version_retries += len(stale)
            v2, ver2 = self.store.get(keys[stale])
            values[stale], versions[stale] = v2, ver2
            stale = stale[ver2 < min_versions[stale]]
        self.rows_fetched += len(keys)
        with self._cv:
            for block in self._blocks:
                if block.start == first_id:
                    block.values = values
            self._cv.notify_all()
