"""The store agent: a trainer's store traffic in a process of its own, rows handed over in shared memory.

Parsing Redis replies and running the version protocol costs interpreter
time; in the trainer's process that time is taken under its GIL, from
training. So each trainer starts one agent (``StoreAgent``, started with
the trainer and dying with it). The agent runs ``trainers.storeio.StoreIO``
(the same issue-order rules, version waits, planted faults) against the
store, and the two meet through:

* two rings in shared memory (``memfd`` mappings, one per direction): the
  trainer writes fetch requests (keys, versions) and evicted rows into
  one, the agent writes fetched rows into the other. Each ring has one
  writer that allocates records in order and one reader that frees them in
  order; a full ring makes its writer wait (back-pressure), so memory stays
  bounded whatever the plans ask;
* a Unix socket pair carrying fixed 48-byte messages (``struct``, never
  pickle) that say where each record is and when it is freed. A message is
  sent only after its record is written, and the socket's system calls
  order the two, so no memory fence is needed on any architecture.

The trainer's side (``StoreAgent``) offers what ``StoreIO`` offers (fetch,
write_back, mark_iteration, take, drain, close, written_through), so
``CachedEmbeddings`` does not know which one it has. Its work per iteration:
copy request arrays and evicted rows into the ring, copy arrived rows out
of it, one system call per message; no Redis, no parsing, no threads.

``python -m trainers.storeagent`` is the agent's process; it reads the run
directory as the trainer does, so it needs nothing on its command line but
the descriptors it inherits.
"""

from __future__ import annotations

import argparse
import logging
import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque

import numpy as np

from trainers.storeio import TAKE_GRACE_S, StoreIOError

log = logging.getLogger("bagpipe")

# Message: kind, then five int64 fields whose meaning depends on the kind.
MSG = struct.Struct("<6q")
# trainer -> agent
GET, PUT, MARK, FREED, DRAIN, CLOSE = 1, 2, 3, 4, 5, 6
# agent -> trainer (FREED too, for the request ring)
READY, ROWS, MARKED, DRAINED, ERROR = 11, 12, 13, 14, 15
START_TIMEOUT_S = 60.0  # the agent imports numpy and redis and connects to every shard


class Ring:
    """A byte ring over a shared mapping. The writer allocates records in order, the reader frees
    them in order; positions only grow (offset = position % capacity), so the writer knows how
    much is free from the reader's last "freed through" position."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.capacity = buf, len(buf)
        self.produced = 0  # writer: end of the last record allocated
        self.freed = 0  # writer: the reader has freed everything before this position

    def alloc(self, nbytes: int) -> tuple[int, int] | None:
        """(offset, end position) of a new record of ``nbytes``, or None while the ring is too full.
        A record never wraps: one that would is placed at offset 0 and the tail is skipped."""
        if nbytes > self.capacity // 2:
            raise ValueError(f"a record of {nbytes} bytes does not fit a ring of {self.capacity}")
        pos = self.produced
        off = pos % self.capacity
        if off + nbytes > self.capacity:
            pos += self.capacity - off
            off = 0
        if pos + nbytes - self.freed > self.capacity:
            return None
        self.produced = pos + nbytes
        return off, self.produced

    def array(self, off: int, dtype, count: int) -> np.ndarray:
        return np.frombuffer(self.buf, dtype=dtype, count=count, offset=off)


def _shared(size: int, name: str) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


class _Channel:
    """Fixed-size messages over one end of the socket pair (an ERROR carries its text after it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self._send_lock = threading.Lock()

    def send(self, kind: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0, e: int = 0, extra: bytes = b"") -> None:
        with self._send_lock:
            self.sock.sendall(MSG.pack(kind, a, b, c, d, e) + extra)

    def receive(self, timeout_s: float | None) -> list[tuple]:
        """The messages that arrived, waiting up to ``timeout_s`` for the first; EOFError once closed."""
        ready, _, _ = select.select([self.sock], [], [], timeout_s)
        if ready:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("the other end closed")
            self._buf += data
        out = []
        while len(self._buf) >= MSG.size:
            msg = MSG.unpack_from(self._buf)
            extra = msg[1] if msg[0] == ERROR else 0
            if len(self._buf) < MSG.size + extra:
                break
            text = self._buf[MSG.size:MSG.size + extra].decode(errors="replace")
            self._buf = self._buf[MSG.size + extra:]
            out.append(msg + ((text,) if msg[0] == ERROR else ()))
        return out


class _Block:
    """One plan's fetches on the trainer's side: their rows as they arrive, how many are still to be used."""

    __slots__ = ("start", "n", "values", "arrived", "left")

    def __init__(self, start: int, n: int, width: int) -> None:
        self.start, self.n, self.left, self.arrived = start, n, n, 0
        self.values = np.empty((n, width), np.float32)


class StoreAgent:
    """The trainer's side of its store agent (see the module docstring); a drop-in for ``StoreIO``."""

    def __init__(self, run_dir: str, rank: int, width: int, wait_timeout_s: float, ring_bytes: int,
                 cpus: set[int] | None = None) -> None:
        from bagpipe.procs import child_setup

        self.rank, self.width, self.wait_timeout_s = rank, width, wait_timeout_s
        req_fd, req_buf = _shared(ring_bytes, f"bagpipe-requests-{rank}")
        rows_fd, rows_buf = _shared(ring_bytes, f"bagpipe-rows-{rank}")
        self.requests, self.rows = Ring(req_buf), Ring(rows_buf)
        self._rows_freed = 0  # reader of the rows ring: freed through here (told to the agent)
        self._rows_told = 0
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = (theirs.fileno(), req_fd, rows_fd)
        cmd = [sys.executable, "-m", "trainers.storeagent", "--run-dir", str(run_dir), "--rank", str(rank),
               "--fds", ",".join(map(str, fds)), "--ring-bytes", str(ring_bytes),
               "--wait-timeout", repr(float(wait_timeout_s))]
        self.proc = subprocess.Popen(cmd, pass_fds=fds, stdin=subprocess.DEVNULL,
                                     preexec_fn=child_setup(new_session=False, cpus=cpus))
        theirs.close()
        os.close(req_fd)
        os.close(rows_fd)
        self.chan = _Channel(mine)
        self.blocks: deque[_Block] = deque()
        self._by_start: dict[int, _Block] = {}
        self.written_through_seen = -1
        self._drained = 0
        self._drains = 0
        deadline = time.monotonic() + max(START_TIMEOUT_S, wait_timeout_s)
        self._ready = False
        while not self._ready:
            self._pump(deadline, "start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    # ------------------------------------------------------------ StoreIO's interface
    @property
    def written_through(self) -> int:
        self._pump(None, "", wait=False)
        return self.written_through_seen

    def fetch(self, first_id: int, keys: np.ndarray, min_versions: np.ndarray) -> None:
        n = len(keys)
        # Keys then versions, in chunks that fit the ring: each chunk is a block of consecutive fetch ids.
        per = max(1, self.requests.capacity // 4 // 16)
        for lo in range(0, n, per):
            hi = min(n, lo + per)
            block = _Block(first_id + lo, hi - lo, self.width)
            self.blocks.append(block)
            self._by_start[block.start] = block
            off, end = self._alloc(self.requests, 16 * (hi - lo))
            self.requests.array(off, np.int64, hi - lo)[:] = keys[lo:hi]
            self.requests.array(off + 8 * (hi - lo), np.int64, hi - lo)[:] = min_versions[lo:hi]
            self._tell(GET, block.start, hi - lo, off, end)

    def write_back(self, keys: np.ndarray, values: np.ndarray, version: int) -> None:
        n = len(keys)
        row_bytes = 8 + 4 * self.width
        per = max(1, self.requests.capacity // 4 // row_bytes)
        for lo in range(0, n, per):
            hi = min(n, lo + per)
            m = hi - lo
            off, end = self._alloc(self.requests, m * row_bytes)
            self.requests.array(off, np.int64, m)[:] = keys[lo:hi]
            self.requests.array(off + 8 * m, np.float32, m * self.width).reshape(m, self.width)[:] = values[lo:hi]
            self._tell(PUT, version, m, off, end)

    def mark_iteration(self, iteration: int) -> None:
        self._tell(MARK, iteration)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Block until the rows of fetch ``ids`` have arrived; returns them stacked."""
        ids = np.asarray(ids, np.int64)
        out = np.empty((len(ids), self.width), np.float32)
        deadline = time.monotonic() + self.wait_timeout_s + TAKE_GRACE_S
        found = 0
        for block in list(self.blocks):
            here = np.flatnonzero((ids >= block.start) & (ids < block.start + block.n))
            if not len(here):
                continue
            while block.arrived < block.n:
                self._pump(deadline, f"fetches {block.start}..{block.start + block.n - 1}")
            out[here] = block.values[ids[here] - block.start]
            found += len(here)
            block.left -= len(here)
            if block.left == 0:
                self.blocks.remove(block)
                del self._by_start[block.start]
        if found != len(ids):
            raise StoreIOError(f"{len(ids) - found} of fetch ids {ids.tolist()[:8]}... were never issued or already used")
        return out

    def drain(self) -> None:
        """Wait until every issued operation has run in the agent."""
        self._drains += 1
        self._tell(DRAIN, self._drains)
        deadline = time.monotonic() + max(self.wait_timeout_s, 60.0)
        while self._drained < self._drains:
            self._pump(deadline, "the store operations to finish")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.chan.send(CLOSE)
            except OSError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # by its own pid
                self.proc.wait()
        self.chan.sock.close()
        for ring in (self.requests, self.rows):
            try:
                ring.buf.close()
            except BufferError:
                pass  # a view is still alive; the mapping goes with the process

    # ------------------------------------------------------------ messages
    def _alloc(self, ring: Ring, nbytes: int) -> tuple[int, int]:
        deadline = time.monotonic() + self.wait_timeout_s
        while True:
            got = ring.alloc(nbytes)
            if got is not None:
                return got
            self._pump(deadline, "room in the request ring (the agent is behind)")

    def _tell(self, kind: int, *fields: int) -> None:
        """A message to the agent; a closed socket means the agent died, and the error says so."""
        try:
            self.chan.send(kind, *fields)
        except OSError:
            raise self._agent_gone() from None

    def _agent_gone(self) -> StoreIOError:
        try:
            code = self.proc.wait(timeout=self.wait_timeout_s)
        except subprocess.TimeoutExpired:
            return StoreIOError(f"the store agent of rank {self.rank} (pid {self.proc.pid}) closed its socket "
                                "and has not exited")
        return StoreIOError(f"the store agent of rank {self.rank} (pid {self.proc.pid}) exited with code {code}"
                            f"{' (killed by signal %d)' % -code if code < 0 else ''}")

    def _pump(self, deadline: float | None, waiting_for: str, wait: bool = True) -> None:
        """Handle the agent's messages; with ``wait``, wait for at least one until ``deadline``."""
        timeout = 0.0 if not wait else max(0.0, min(1.0, deadline - time.monotonic()))
        try:
            messages = self.chan.receive(timeout)
        except (EOFError, OSError):
            messages = None
        if messages is None or (wait and not messages and self.proc.poll() is not None):
            raise self._agent_gone() from None
        for msg in messages:
            kind = msg[0]
            if kind == ROWS:
                _, start, row0, n, off, end = msg
                block = self._by_start[start]
                block.values[row0:row0 + n] = self.rows.array(off, np.float32, n * self.width).reshape(n, self.width)
                block.arrived += n
                self._rows_freed = end
            elif kind == FREED:
                self.requests.freed = msg[1]
            elif kind == MARKED:
                self.written_through_seen = msg[1]
            elif kind == DRAINED:
                self._drained = msg[1]
            elif kind == READY:
                self._ready = True
            elif kind == ERROR:
                raise StoreIOError(f"store agent of rank {self.rank} (pid {self.proc.pid}): {msg[6]}")
        if self._rows_freed > self._rows_told:
            self._tell(FREED, self._rows_freed)
            self._rows_told = self._rows_freed
        if wait and not messages and deadline is not None and time.monotonic() >= deadline:
            raise StoreIOError(f"rank {self.rank}: waited {self.wait_timeout_s}s for {waiting_for} from the store "
                               f"agent (pid {self.proc.pid})")


# ---------------------------------------------------------------- the agent's process
class _AgentLoop:
    """The agent: requests in from the trainer, into ``io`` in order; fetched rows and watermarks out."""

    def __init__(self, chan: _Channel, requests: Ring, rows: Ring, io, width: int) -> None:
        self.chan, self.requests, self.rows, self.io, self.width = chan, requests, rows, io, width
        self.cv = threading.Condition()
        self.closing = False
        self.failure: BaseException | None = None

    def run(self) -> None:
        sender = threading.Thread(target=self._send_rows, name="agent-rows", daemon=True)
        sender.start()
        try:
            self._serve()
        finally:
            with self.cv:
                self.closing = True
                self.cv.notify_all()
            sender.join(5)

    def _serve(self) -> None:
        freed_told = 0
        while True:
            if self.failure is not None:
                raise self.failure
            try:
                messages = self.chan.receive(0.5)
            except EOFError:
                return  # the trainer is gone; so are we
            freed = freed_told
            for msg in messages:
                kind = msg[0]
                if kind == GET:
                    _, start, n, off, end, _ = msg
                    keys = self.requests.array(off, np.int64, n).copy()
                    versions = self.requests.array(off + 8 * n, np.int64, n).copy()
                    self.io.fetch(start, keys, versions)
                    freed = end
                elif kind == PUT:
                    _, version, n, off, end, _ = msg
                    keys = self.requests.array(off, np.int64, n).copy()
                    values = self.requests.array(off + 8 * n, np.float32, n * self.width).reshape(n, self.width).copy()
                    self.io.write_back(keys, values, version)
                    freed = end
                elif kind == MARK:
                    self.io.mark_iteration(msg[1])
                elif kind == FREED:
                    with self.cv:
                        self.rows.freed = msg[1]
                        self.cv.notify_all()
                elif kind == DRAIN:
                    self.io.drain()
                    self.chan.send(MARKED, self.io.written_through)
                    self.chan.send(DRAINED, msg[1])
                elif kind == CLOSE:
                    return
            if freed > freed_told:
                self.chan.send(FREED, freed)
                freed_told = freed

    def _send_rows(self) -> None:
        """Forward fetched blocks into the rows ring (in chunks, waiting for room) and watermarks."""
        try:
            told = -2
            per = max(1, self.rows.capacity // 4 // (4 * self.width))
            while not self.closing:
                for start, values in self.io.pop_ready(0.05):
                    # A block of one fetch id range arrives whole; split it so each record fits the ring.
                    for lo in range(0, len(values), per):
                        part = values[lo:lo + per]
                        with self.cv:
                            while (got := self.rows.alloc(part.nbytes)) is None and not self.closing:
                                self.cv.wait(0.5)
                        if got is None:
                            return
                        off, end = got
                        self.rows.array(off, np.float32, part.size)[:] = part.reshape(-1)
                        self.chan.send(ROWS, start, lo, len(part), off, end)
                if self.io.written_through != told:
                    told = self.io.written_through
                    self.chan.send(MARKED, told)
        except BaseException as exc:  # the main loop reports it and ends the agent
            self.failure = exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.storeagent", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--fds", required=True, help="socket, request ring, rows ring")
    parser.add_argument("--ring-bytes", type=int, required=True)
    parser.add_argument("--wait-timeout", type=float, required=True, help="seconds a row's version may be awaited")
    args = parser.parse_args(argv)
    from bagpipe.config import RunConfig
    from bagpipe.dataset import Dataset
    from bagpipe.log import init_logger
    from bagpipe.rundir import RunDir
    from bagpipe.store import EmbeddingStore
    from trainers import mutants

    init_logger(f"store agent {args.rank}")
    sock_fd, req_fd, rows_fd = (int(x) for x in args.fds.split(","))
    chan = _Channel(socket.socket(fileno=sock_fd))
    requests = Ring(mmap.mmap(req_fd, args.ring_bytes))
    rows = Ring(mmap.mmap(rows_fd, args.ring_bytes))
    store = io = None
    try:
        run = RunDir(args.run_dir)
        cfg = RunConfig.from_dict(run.read_config())
        endpoints = run.endpoints()
        table_sizes = [n for _, n in Dataset(cfg.data).tables]
        store = EmbeddingStore(cfg.store_config(endpoints.get("redis_cluster_url")), endpoints["redis"],
                               cfg.embedding_dim, cfg.state_width, table_sizes)
        io_cls, io_kwargs = mutants.select_store_io()
        io = io_cls(store, wait_timeout_s=args.wait_timeout, **io_kwargs)
        chan.send(READY)
        _AgentLoop(chan, requests, rows, io, store.width).run()
        return 0
    except Exception as exc:  # told to the trainer, which stops the job naming us
        log.error("%s", exc)
        try:
            text = str(exc).encode()[:2000]
            chan.send(ERROR, len(text), extra=text)
        except OSError:
            pass
        return 1
    finally:
        if io is not None:
            io.close()
        if store is not None:
            store.close()


if __name__ == "__main__":
    sys.exit(main())
