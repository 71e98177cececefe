"""Compiled kernels of the fast planner (``oracle.planner``), grouped by job.

* ``layout``: the field numbers of every record and the codes (policies, errors);
* ``state``: the named records the public kernels take (``Rows``, ``Window``, ``Queues``, ``Episodes``,
  ``StepBuffers``), and what each of their arrays holds;
* ``primitives``: prefetch, hash index, radix sort, pools, queue lists, heaps, bit masks;
* ``residency``: one trainer's rows: loading the window, retiring uses, victims, bypass, slots;
* ``episodes``: rows across trainers: episodes, write-backs, versions, and each iteration's plan.

Every public function is a numba ``@njit(cache=True)`` kernel over those
records of numpy arrays (the helpers inside take the arrays themselves);
``oracle.planner`` owns the records, grows their arrays between calls, runs
the per-trainer kernels in threads and slices the outputs into each plan's
fields. The rules are those of ``oracle.reference`` (the executable
specification); only the bookkeeping differs.

* **Rows of a trainer** live in an open-addressing hash index (key -> entry)
  over an entry pool: one 64-byte record per row, a single cache line
  (``E64`` holds its int64 fields, ``E32`` is an int32 view of the same
  memory for the others). A row has an entry while it is resident or used
  in the loaded window, so the pool grows with the window and the cache,
  never with table size.
* **The window** is a ring of R = horizon + 2 iterations. Loading
  an iteration sorts its distinct keys once (radix sort) and links every
  occurrence to the row's previous one, so retiring an iteration reads each
  row's next use from the ring instead of a per-row deque.
* **Victims** come from structures that give exactly the reference heap's
  order without a heap operation per use:
  - ``bagpipe`` orders (-next use, frequency, last use, key). Rows with no
    use in the window (set A) enter only when an iteration retires, with
    last use = that iteration and in key order, so one FIFO per frequency
    gives A's order (frequencies >= 64, rare there, use a small heap). Rows
    whose next use is v sit in bucket v, an unordered list sorted (stably,
    by radix) only when a victim search reaches it.
  - ``lru`` / ``lfu`` order (last use, key) / (frequency, last use, key),
    which only grow while a row stays resident: FIFOs per frequency again
    give the order, with lazily refreshed heap entries beyond 63.
  Every queued item carries a stamp; an item whose stamp differs from its
  row's current stamp is stale and skipped. Queue nodes are taken in
  append order from a pool and never reused in place (``compact_nodes``
  moves the live ones to the front, list by list, when the pool is full),
  so walking a list, as victim choice does, reads memory forwards.
* **Episodes** (rows held by several trainers) are a global hash index over
  records (one cache line each for up to two trainers) with present/pending
  bit masks and each holder's slot, so plans never read another trainer's
  row entries; versions
  of write-backs not yet acknowledged are a separate key -> version map, with
  a FIFO of (version, key) to forget them in order.

Residency is planned on demand: a row read at k and not resident is
fetched and installed in plan k (``oracle.staging`` moves the store fetches
ahead afterwards), so no fetch is ever pending across steps or deferred. One step is ``advance`` per trainer (retire k-1, fetch for k;
each touches only its trainer's state, so trainers run in parallel), then
``finish_step`` (k-1's evictions and write-backs) and, once plan k-1 has
been handed out, ``plan_iteration`` (plan k). ``load`` brings the next
iteration into each trainer's window, also in parallel.

Memory latency, not arithmetic, bounds this code: free lists of entries
and slots are array stacks (a linked free list costs a dependent cache miss
per allocation),
loops prefetch the records they will need a few iterations ahead, and
helpers that take many arrays are compiled without reference counting
(``_nrt=False``; they allocate nothing) so that calling them costs no
atomic operations.
"""

from __future__ import annotations

import hashlib
import os
import pathlib


def _drop_stale_kernels() -> None:
    """Numba's cache checks a kernel's own file only, not the files of the kernels it calls; a kernel
    cached before an edit to ``primitives`` would run the old helper. So the package's sources, hashed
    together, stamp the cache, and a different stamp empties it before any kernel loads."""
    here = pathlib.Path(__file__).parent
    cache = here / "__pycache__"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(here.glob("*.py")))).hexdigest()
    stamp = cache / "kernels.sha256"
    try:
        if stamp.read_text() == digest:
            return
    except OSError:
        pass
    try:
        cache.mkdir(exist_ok=True)
        for f in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            f.unlink(missing_ok=True)
        tmp = cache / f"kernels.sha256.{os.getpid()}"
        tmp.write_text(digest)
        os.replace(tmp, stamp)
    except OSError:
        pass  # a read-only tree: numba then compiles in memory, which is always current


_drop_stale_kernels()

from oracle.fastplan.layout import *  # noqa: E402,F401,F403  (the field numbers, for the shell)
from oracle.fastplan.primitives import compact_heaps, compact_nodes, distinct_keys, rehash  # noqa: E402,F401
from oracle.fastplan.residency import advance, load  # noqa: E402,F401
from oracle.fastplan.episodes import finish_step, flush, forget_writebacks, plan_iteration  # noqa: E402,F401
