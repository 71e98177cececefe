"""The Oracle Cacher process: the planner inside a thin ZeroMQ shell.

It binds a ROUTER socket; every trainer connects a DEALER, says HELLO with
its rank, then receives plans in order and returns one CREDIT per finished
iteration. Credits bound how far ahead the oracle runs (``max_ahead``), so
its memory stays bounded, and carry each trainer's write-back watermark so
the planner can forget write-backs known to have landed.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import zmq

from bagpipe.config import RunConfig
from bagpipe.dataset import Dataset
from bagpipe.rundir import RunDir
from bagpipe.curve import ServerSecurity, close_router, control_router
from bagpipe.faults import Fault
from bagpipe.log import init_logger
from bagpipe.auth import AuthError, hello_valid, read_secret
from bagpipe.wire import (MAX_CONTROL_BYTES, Control, Credit, End, Error, Hello, WireError, decode_control,
                         encode_control, encode_plan)

from oracle.partitions import make_planner
from oracle.workers import RemotePartition, WorkerError, WorkerLink, owner_of, partitions_of
from oracle.planner import BatchSource, Planner, PlanError

log = logging.getLogger("bagpipe")
DROP_LOG_LIMIT = 10  # dropped messages logged one by one; the rest only counted
CONNECT_TIMEOUT_S = 120.0  # the least the oracle waits for every trainer's hello at start


class OracleError(RuntimeError):
    pass


class _Shifted:
    """Batches [start, stop) of a batch source, renumbered from 0."""

    def __init__(self, batches: BatchSource, start: int, stop: int) -> None:
        self.batches, self.start, self.stop = batches, start, stop
        self.column_tables = getattr(batches, "column_tables", None)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        return self.batches[self.start + i]


def segments(cfg: RunConfig, iterations: int, start: int = 0) -> list[tuple[int, int]]:
    """The checkpoint segments [lo, hi) of iterations start..iterations-1 (see ``SegmentedPlans``)."""
    bounds = []
    lo = start
    while lo < iterations:
        hi = cfg.segment_end(lo, iterations)
        bounds.append((lo, hi))
        lo = hi
    return bounds


class SegmentedPlans:
    """The plan stream of a run, one planner per checkpoint segment.

    With checkpoints (or evaluations) every N iterations, iterations are
    planned in segments [0, N), [N, 2N), ... (``RunConfig.segment_end``); each
    segment's planner starts with empty caches and its last plan evicts and
    writes back every row. So the plans after a checkpoint are the same
    whether the run went on or was resumed from it, a checkpoint needs nothing
    from the oracle but its position, and an evaluation reads every row from
    the store. Plans
    are renumbered to absolute iterations (and so are the write-back versions
    that fetches wait for).
    """

    def __init__(self, cfg: RunConfig, batches: BatchSource, iterations: int, start: int = 0,
                 links: list | None = None) -> None:
        self.cfg, self.batches, self.iterations, self.start = cfg, batches, iterations, start
        self.bounds = segments(cfg, iterations, start)
        self.links = links or []  # oracle.workers.WorkerLink per worker process: their partitions come from there
        self.planner: Planner | None = None  # or an oracle.partitions.PartitionedPlanner
        self.offset = 0
        self.stats: list = []

    def plans(self):
        for lo, hi in self.bounds:
            self.offset = lo
            workers = self.cfg.oracle_workers
            remote = {p: RemotePartition(self.links[owner_of(p, workers) - 1], p, lo, hi - lo)
                      for p in range(self.cfg.oracle_partitions) if owner_of(p, workers) > 0}
            self.planner = make_planner(self.cfg.oracle_config(iterations=hi - lo), _Shifted(self.batches, lo, hi),
                                        remote)
            parts = self.cfg.oracle_partitions
            log.info("iterations %d..%d: %s%s", lo, hi - 1, self.planner.horizon_choice.line(),
                     f"; {parts} partitions planned in threads" if parts > 1 and not workers else
                     f"; {parts} partitions, {parts - len(remote)} planned here and {len(remote)} by "
                     f"{workers} worker process(es)" if workers else "")
            yield from self.planner.plans(offset=lo)
            self._add_stats(self.planner.stats)

    def epoch_of(self, i: int) -> int:
        """The epoch iteration i reads (named in each plan's header); the batches come from bagpipe.dataset."""
        return self.batches.epoch_of(i)

    def note_writebacks_applied(self, through_iteration: int) -> None:
        if self.planner is not None:
            self.planner.note_writebacks_applied(through_iteration - self.offset)

    def _add_stats(self, stats: list) -> None:
        # What the lookahead took, against its budget (the longest segment's window).
        choice = self.planner.horizon_choice
        window = {"horizon": choice.horizon, "horizon_reason": choice.reason,
                  "window_mb": round(choice.window_bytes / 2**20, 3), "oracle_memory_mb": choice.memory_mb,
                  "oracle_partitions": self.cfg.oracle_partitions, "oracle_bypass": self.cfg.oracle_bypass}
        if not self.stats:
            self.stats = [dict(vars(s), **window) for s in stats]
            return
        for total, s in zip(self.stats, stats):
            for k, v in vars(s).items():
                total[k] = max(total[k], v) if k.startswith("peak") else total[k] + v
            if window["window_mb"] >= total["window_mb"]:
                total.update(window)


class OracleServer:
    """Streams a planner's plans to N trainers with credit-based flow control."""

    def __init__(self, planner: SegmentedPlans, job: str, endpoint: str, trainers: int, max_ahead: int,
                 timeout_s: float, curve_dir: str = "", secret: bytes | None = None) -> None:
        self.planner, self.job, self.trainers = planner, job, trainers
        self.secret = secret  # None: any hello is taken (tests of the planner alone)
        self.dropped = 0  # messages that did not decode or authenticate, ignored
        self.max_ahead, self.timeout_s = max_ahead, timeout_s
        self.ctx = zmq.Context()
        self.security = ServerSecurity(self.ctx, curve_dir)
        try:  # trainers send only control messages: anything bigger is refused before it is read
            self.sock = control_router(self.ctx, self.security, endpoint, MAX_CONTROL_BYTES)
        except zmq.ZMQError as exc:
            raise OracleError(f"oracle cannot bind {endpoint}: {exc}") from None
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.identity: dict[int, bytes] = {}
        self.fault = Fault.from_env()
        self._held_plan: list | None = None
        self.done = [planner.start - 1] * trainers  # last iteration each trainer finished
        self.written_through = [planner.start - 1] * trainers  # each trainer's landed write-backs

    def _recv(self, timeout_s: float) -> tuple[bytes, Control] | None:
        """The next message that decodes and authenticates, or None after ``timeout_s``. Any other
        message is dropped and counted: a stranger's bytes never stop the job nor extend a wait."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = max(0.0, deadline - time.monotonic())
            if not self.sock.poll(int(left * 1000)):
                return None
            frames = self.sock.recv_multipart(copy=True)
            ident, frames = frames[0], frames[1:]
            try:
                msg = decode_control(frames, self.job)
            except WireError as exc:
                self._drop(f"does not decode: {exc}")
                continue
            why = self._unauthentic(ident, msg)
            if why is None:
                return ident, msg
            self._drop(why)

    def _unauthentic(self, ident: bytes, msg: Control) -> str | None:
        """Why ``msg`` is not taken (None: it is): a hello must prove the secret for its rank; anything
        else must come over the connection that rank's hello opened."""
        rank = msg.rank
        if not 0 <= rank < self.trainers:
            return f"names rank {rank}, not one of the {self.trainers} trainers"
        if isinstance(msg, Hello):
            if self.secret is not None and not hello_valid(self.secret, self.job, rank, msg.token):
                return f"is a hello for rank {rank} without this job's token"
            return None
        if self.identity.get(rank) != ident:
            return f"is a {type(msg).__name__} for rank {rank} from a connection that is not rank {rank}'s"
        return None

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if self.dropped <= DROP_LOG_LIMIT:
            log.warning("dropped a message to %s that %s", self.endpoint, why)

    def _handle(self, ident: bytes, msg: Control) -> None:
        rank = msg.rank
        if isinstance(msg, Hello):
            self.identity[rank] = ident
        elif isinstance(msg, Credit):
            if msg.iteration != self.done[rank] + 1:
                raise OracleError(f"trainer {rank} acknowledged iteration {msg.iteration}, "
                                  f"expected {self.done[rank] + 1}")
            self.done[rank] = msg.iteration
            self.written_through[rank] = msg.written_through
            self.planner.note_writebacks_applied(min(self.written_through))
        elif isinstance(msg, Error):
            raise OracleError(f"trainer {rank} stopped: {msg.message}")
        else:
            raise OracleError(f"trainer {rank} sent {type(msg).__name__}, which only the oracle sends")

    def serve(self) -> None:
        # Trainers take a while to start (torch, the process group, the batches); a short plan timeout
        # is for a stream that stopped, not for start-up. A trainer that fails to start is the job
        # runner's to report.
        wait_s = max(self.timeout_s, CONNECT_TIMEOUT_S)
        deadline = time.monotonic() + wait_s
        while len(self.identity) < self.trainers:
            left = deadline - time.monotonic()
            msg = self._recv(max(left, 0.0)) if left > 0 else None
            if msg is None:
                missing = sorted(set(range(self.trainers)) - set(self.identity))
                raise OracleError(f"trainers {missing} never connected to {self.endpoint} within {wait_s:g}s")
            self._handle(*msg)
        log.info("all %d trainers connected to %s", self.trainers, self.endpoint)
        for i, plans in self.planner.plans():
            # Flow control: plan i goes out only when every trainer has finished i - max_ahead.
            while min(self.done) < i - self.max_ahead:
                msg = self._recv(self.timeout_s)
                if msg is None:
                    slow = self.done.index(min(self.done))
                    raise OracleError(f"no credit from trainer {slow} within {self.timeout_s}s (last finished iteration {self.done[slow]})")
                self._handle(*msg)
            for t, plan in enumerate(plans):
                self._send_plan(i, t, encode_plan(plan, self.job, self.planner.epoch_of(i)))
            while (msg := self._recv(0)) is not None:
                self._handle(*msg)
        for t in range(self.trainers):
            self._send(t, encode_control(End(rank=t), self.job))
        last = self.planner.iterations - 1
        while min(self.done) < last:
            msg = self._recv(self.timeout_s)
            if msg is None:
                raise OracleError("trainers did not finish after the last plan")
            self._handle(*msg)

    def _send_plan(self, i: int, rank: int, frames: list) -> None:
        f = self.fault
        if f is None or f.rank != rank or i not in (f.iteration, f.iteration + 1):
            self._send(rank, frames)
            return
        # Injected faults (bagpipe check): each must be caught by the trainer or be harmless.
        if f.hits("plan-delay", i):
            time.sleep(2.0)
        if f.hits("plan-drop", i):
            return
        if f.hits("plan-reorder", i):
            self._held_plan = frames
            return
        if f.hits("plan-corrupt", i):
            frames = list(frames)
            damaged = bytearray(frames[2])
            damaged[0] ^= 0xFF
            frames[2] = bytes(damaged)
        self._send(rank, frames)
        if f.hits("plan-duplicate", i):
            self._send(rank, frames)
        if f.kind == "plan-reorder" and i == f.iteration + 1 and self._held_plan is not None:
            self._send(rank, self._held_plan)
            self._held_plan = None

    def _send(self, rank: int, frames: list) -> None:
        try:
            self.sock.send_multipart([self.identity[rank]] + frames, copy=False)
        except zmq.ZMQError as exc:
            # ROUTER_MANDATORY: a peer whose connection closed is unreachable, not silently skipped.
            raise OracleError(f"trainer {rank} is gone (its connection to {self.endpoint} closed: {exc})") from None

    def close(self, error: str | None = None) -> None:
        if self.dropped:
            log.warning("dropped %d message(s) that did not decode or authenticate", self.dropped)
        farewells = [[ident] + encode_control(Error(rank=t, message=error), self.job)
                     for t, ident in self.identity.items()] if error else []
        close_router(self.ctx, self.security, self.sock, farewells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagpipe oracle", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--endpoint", required=True, help="ZeroMQ endpoint to bind, e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--first-iteration", type=int, default=0, help="first iteration to plan (a resumed run)")
    parser.add_argument("--workers", default="", help="the oracle workers' endpoints, in worker order (comma-separated)")
    args = parser.parse_args(argv)
    init_logger("oracle")
    run = RunDir(args.run_dir)
    cfg = RunConfig.from_dict(run.read_config())
    job = run.job_id()
    try:
        secret = read_secret(run.secret_path)
    except AuthError as exc:
        log.error("%s", exc)
        return 1

    endpoints = [e for e in args.workers.split(",") if e]
    if len(endpoints) != cfg.oracle_workers:
        log.error("--workers names %d endpoint(s); the job has oracle_workers = %d", len(endpoints), cfg.oracle_workers)
        return 2
    sparse = Dataset(cfg.data).sparse_batches(cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle, epochs=cfg.epochs)
    iterations = cfg.iterations or len(sparse)
    links = [WorkerLink(w, e, job, secret, cfg.trainers, partitions_of(w, cfg.oracle_partitions, cfg.oracle_workers),
                        cfg.plan_timeout_s, cfg.zmq_curve_dir, sparse.epoch_of, start=args.first_iteration)
             for w, e in enumerate(endpoints, start=1)]
    stream = SegmentedPlans(cfg, sparse, iterations, start=args.first_iteration, links=links)
    server = OracleServer(stream, job, args.endpoint, cfg.trainers, cfg.max_ahead, cfg.plan_timeout_s,
                          cfg.zmq_curve_dir, secret)
    error = None
    try:
        server.serve()
        run.write_oracle_stats(stream.stats)
        log.info("planned iterations %d..%d", args.first_iteration, iterations - 1)
        return 0
    except (OracleError, WireError, PlanError, WorkerError) as exc:
        error = str(exc)
        log.error("%s", exc)
        return 1
    finally:
        server.close(error)
        for link in links:
            link.close(error)
