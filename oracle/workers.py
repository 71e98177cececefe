"""Partitions planned in other processes (config key ``oracle_workers``), streamed to the oracle.

With ``oracle_partitions = K`` and ``oracle_workers = W``, partition p is
planned by process ``p % (W + 1)``: 0 is the oracle, 1..W are worker
processes (``bagpipe oracle-worker``), each on the node the job runner puts
it on (worker w on node ``w % nnodes``). A worker plans its partitions
exactly as the oracle's own threads would (``PartitionedPlanner`` with
``local`` = its partitions, segment by segment as ``SegmentedPlans`` cuts the
run) and streams each iteration's on-demand plans, unmerged, to the oracle.
The oracle merges every partition's plans in partition order and stages the
fetches, as it does when all K run in its threads: so the trainers receive
the very plans of a one-process run with K partitions, and nothing about
them changes.

The worker binds (a ROUTER on its node's address); the oracle connects a
DEALER (``WorkerLink``), says HELLO with a token proving the job's secret
for that worker (``bagpipe.auth.hello_token`` over ``<job>/worker``), then
takes iteration i's plans in a fixed order (partition, then trainer) and
returns one CREDIT per iteration. Credits bound how far ahead a worker runs
(``max_ahead``) and carry the trainers' write-back watermark. Every wait is
bounded by ``plan_timeout_s``: a worker that stops, goes silent or is cut off
stops the job with a message naming it and its endpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from bagpipe.auth import AuthError, hello_token, hello_valid, read_secret
from bagpipe.config import RunConfig
from bagpipe.curve import ServerSecurity, close_router, control_router, secure_client
from bagpipe.dataset import Dataset
from bagpipe.log import init_logger
from bagpipe.rundir import RunDir
from bagpipe.wire import (KIND_PLAN, MAX_CONTROL_BYTES, Credit, End, Error, Hello, Plan, WireError, decode_control,
                          decode_plan, encode_control, encode_plan, message_kind)

log = logging.getLogger("bagpipe")


class WorkerError(RuntimeError):
    """A partition worker that stopped, went silent, or sent what it should not (names it and where)."""


def owner_of(partition: int, workers: int) -> int:
    """The process that plans ``partition``: 0 the oracle, 1..workers the worker processes."""
    return partition % (workers + 1)


def partitions_of(process: int, partitions: int, workers: int) -> list[int]:
    return [p for p in range(partitions) if owner_of(p, workers) == process]


def worker_job(job: str) -> str:
    """The name a worker's hello token is bound to (never a trainer's: another label, another token)."""
    return f"{job}/worker"


# ------------------------------------------------------------------ the oracle's end
class WorkerLink:
    """The oracle's connection to one worker: its partitions' plans in, credits out.

    ``take(i, p)`` returns partition p's plans (one per trainer) for absolute
    iteration i; the partition threads of the oracle's planner call it
    concurrently, so the socket is used under a lock. When the last of the
    worker's partitions for iteration i is taken, the credit for i goes back.
    """

    def __init__(self, worker: int, endpoint: str, job: str, secret: bytes, trainers: int, partitions: list[int],
                 timeout_s: float, curve_dir: str, epoch_of, start: int = 0) -> None:
        self.worker, self.endpoint, self.job, self.trainers = worker, endpoint, job, trainers
        self.partitions, self.timeout_s, self.epoch_of = list(partitions), timeout_s, epoch_of
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)  # the last credits reach the worker
        secure_client(self.sock, curve_dir)
        self.sock.connect(endpoint)
        self.sock.send_multipart(encode_control(Hello(rank=worker, token=hello_token(secret, worker_job(job), worker)),
                                                self.job))
        self.lock = threading.Lock()
        self.ready: dict[tuple[int, int], list[Plan]] = {}  # (iteration, partition) -> plans per trainer
        self.received_through = start - 1  # the last iteration whose plans have all arrived
        self.untaken: dict[int, set[int]] = {}  # iteration -> partitions not yet taken
        self.written_through = -1  # absolute; sent with each credit

    def name(self) -> str:
        return f"oracle worker {self.worker} at {self.endpoint}"

    def take(self, i: int, p: int) -> list[Plan]:
        with self.lock:
            while (i, p) not in self.ready:
                if i <= self.received_through:
                    raise WorkerError(f"{self.name()}: partition {p}'s plans for iteration {i} were taken twice "
                                      "(internal error)")
                self._receive(self.received_through + 1)
            plans = self.ready.pop((i, p))
            left = self.untaken[i]
            left.discard(p)
            if not left:
                del self.untaken[i]
                self.sock.send_multipart(encode_control(Credit(self.worker, i, self.written_through), self.job))
            return plans

    def note_writebacks_applied(self, through_iteration: int) -> None:
        self.written_through = max(self.written_through, through_iteration)

    def _receive(self, i: int) -> None:
        """Every plan of iteration i: for each of the worker's partitions, one per trainer, in that order."""
        for p in self.partitions:
            plans = []
            for t in range(self.trainers):
                frames = self._next_frames(i)
                if message_kind(frames) != KIND_PLAN:
                    msg = decode_control(frames, self.job)
                    if isinstance(msg, Error):
                        raise WorkerError(f"{self.name()} stopped: {msg.message}")
                    raise WorkerError(f"{self.name()} sent {type(msg).__name__} where partition {p}'s plan for "
                                      f"trainer {t}, iteration {i} was due")
                try:
                    plans.append(decode_plan(frames, self.job, t, i, self.epoch_of(i)))
                except WireError as exc:
                    raise WorkerError(f"{self.name()}, partition {p}: {exc}") from None
            self.ready[(i, p)] = plans
        self.untaken[i] = set(self.partitions)
        self.received_through = i

    def _next_frames(self, i: int) -> list:
        if not self.sock.poll(int(self.timeout_s * 1000)):
            raise WorkerError(f"{self.name()} sent no plan for iteration {i} within {self.timeout_s:g}s (it stopped, "
                              "or the link to it is cut)")
        return self.sock.recv_multipart(copy=True)

    def close(self, error: str | None = None) -> None:
        if error:
            try:
                self.sock.send_multipart(encode_control(Error(self.worker, error), self.job), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.sock.close()
        self.ctx.term()


class RemotePartition:
    """Partition p of one segment, planned by a worker: what ``PartitionedPlanner`` takes for a planner."""

    def __init__(self, link: WorkerLink, partition: int, offset: int, iterations: int) -> None:
        self.link, self.partition, self.offset, self.iterations = link, partition, offset, iterations

    def on_demand_plans(self):
        for k in range(self.iterations):
            plans = self.link.take(self.offset + k, self.partition)
            # In the segment's numbering, as a local partition's planner gives it.
            yield k, [dataclasses.replace(plan, iteration=k) for plan in plans]

    def note_writebacks_applied(self, through_iteration: int) -> None:
        self.link.note_writebacks_applied(through_iteration + self.offset)


# ------------------------------------------------------------------ the worker
class WorkerServer:
    """One worker process's socket: the oracle's hello, then this worker's plans out and credits in."""

    def __init__(self, worker: int, endpoint: str, job: str, secret: bytes, timeout_s: float, max_ahead: int,
                 curve_dir: str = "", start: int = 0) -> None:
        self.worker, self.job, self.secret = worker, job, secret
        self.timeout_s, self.max_ahead = timeout_s, max_ahead
        self.ctx = zmq.Context()
        self.security = ServerSecurity(self.ctx, curve_dir)
        try:  # the oracle sends control messages only
            self.sock = control_router(self.ctx, self.security, endpoint, MAX_CONTROL_BYTES)
        except zmq.ZMQError as exc:
            raise WorkerError(f"oracle worker {worker} cannot bind {endpoint}: {exc}") from None
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.oracle: bytes | None = None  # the connection that proved the secret
        self.credited = start - 1  # the last iteration the oracle has taken
        self.written_through = -1
        self.dropped = 0

    def wait_for_oracle(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while self.oracle is None:
            if not self._handle_one(deadline - time.monotonic()):
                raise WorkerError(f"the oracle never connected to oracle worker {self.worker} at {self.endpoint} "
                                  f"within {self.timeout_s:g}s")

    def send_iteration(self, i: int, frames_per_plan: list[list]) -> None:
        """Iteration i's plans, once the oracle has taken i - max_ahead (credits)."""
        while self.credited < i - self.max_ahead:
            deadline = time.monotonic() + self.timeout_s
            if not self._handle_one(deadline - time.monotonic()):
                raise WorkerError(f"oracle worker {self.worker}: no credit from the oracle within {self.timeout_s:g}s "
                                  f"(last taken iteration {self.credited})")
        for frames in frames_per_plan:
            self._send(frames)
        while self._handle_one(0.0):
            pass

    def finish(self, last: int) -> None:
        self._send(encode_control(End(rank=self.worker), self.job))
        deadline = time.monotonic() + self.timeout_s
        while self.credited < last:
            if not self._handle_one(deadline - time.monotonic()):
                raise WorkerError(f"oracle worker {self.worker}: the oracle did not take the last plans within "
                                  f"{self.timeout_s:g}s")

    def _handle_one(self, timeout_s: float) -> bool:
        """One message that decodes and authenticates (False: none within ``timeout_s``); others dropped."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            left = max(0.0, deadline - time.monotonic())
            if not self.sock.poll(int(left * 1000)):
                return False
            ident, *frames = self.sock.recv_multipart(copy=True)
            try:
                msg = decode_control(frames, self.job)
            except WireError as exc:
                self._drop(f"does not decode: {exc}")
                continue
            if isinstance(msg, Hello):
                if msg.rank == self.worker and hello_valid(self.secret, worker_job(self.job), self.worker, msg.token):
                    self.oracle = ident
                    return True
                self._drop(f"is a hello without this job's token for worker {self.worker}")
                continue
            if ident != self.oracle:
                self._drop(f"is a {type(msg).__name__} from a connection that is not the oracle's")
                continue
            if isinstance(msg, Credit):
                if msg.iteration != self.credited + 1:
                    raise WorkerError(f"oracle worker {self.worker}: credit for iteration {msg.iteration}, expected "
                                      f"{self.credited + 1}")
                self.credited, self.written_through = msg.iteration, msg.written_through
                return True
            if isinstance(msg, Error):
                raise WorkerError(f"the oracle stopped: {msg.message}")
            self._drop(f"is a {type(msg).__name__}, which the oracle does not send")

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if self.dropped <= 10:
            log.warning("dropped a message to %s that %s", self.endpoint, why)

    def _send(self, frames: list) -> None:
        try:
            self.sock.send_multipart([self.oracle] + frames, copy=False)
        except zmq.ZMQError as exc:
            raise WorkerError(f"oracle worker {self.worker}: the oracle is gone (its connection to {self.endpoint} "
                              f"closed: {exc})") from None

    def close(self, error: str | None = None) -> None:
        farewells = [[self.oracle] + encode_control(Error(self.worker, error), self.job)] \
            if error and self.oracle is not None else []
        close_router(self.ctx, self.security, self.sock, farewells)


def serve_partitions(cfg: RunConfig, batches, iterations: int, start: int, worker: int, server: WorkerServer) -> None:
    """Plan this worker's partitions segment by segment (the oracle's segments) and stream them."""
    from oracle.partitions import PartitionedPlanner
    from oracle.process import _Shifted, segments

    mine = partitions_of(worker, cfg.oracle_partitions, cfg.oracle_workers)
    server.wait_for_oracle()
    log.info("oracle worker %d: planning partitions %s of %d for the oracle", worker, mine, cfg.oracle_partitions)
    last = start - 1
    for lo, hi in segments(cfg, iterations, start):
        planner = PartitionedPlanner(cfg.oracle_config(iterations=hi - lo), _Shifted(batches, lo, hi), local=mine)
        applied = -1
        for k, per_partition in planner.partition_plans():
            i = lo + k
            frames = []
            for plans in per_partition:
                for plan in plans:
                    # On the wire, absolute; the arrays stay the segment's.
                    absolute = dataclasses.replace(plan, iteration=i)
                    frames.append(encode_plan(absolute, server.job, batches.epoch_of(i)))
            server.send_iteration(i, frames)
            if server.written_through - lo > applied:
                applied = server.written_through - lo
                planner.note_writebacks_applied(applied)
            last = i
    server.finish(last)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagpipe oracle-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--endpoint", required=True, help="ZeroMQ endpoint to bind, e.g. tcp://10.0.0.2:5601")
    parser.add_argument("--worker", required=True, type=int, help="this worker's number, 1..oracle_workers")
    parser.add_argument("--first-iteration", type=int, default=0, help="first iteration to plan (a resumed run)")
    args = parser.parse_args(argv)
    init_logger(f"oracle worker {args.worker}")
    run = RunDir(args.run_dir)
    cfg = RunConfig.from_dict(run.read_config())
    if not 1 <= args.worker <= cfg.oracle_workers:
        log.error("--worker %d: the job has oracle_workers = %d (workers are 1..%d)", args.worker,
                  cfg.oracle_workers, cfg.oracle_workers)
        return 2
    try:
        secret = read_secret(run.secret_path)
    except AuthError as exc:
        log.error("%s", exc)
        return 1
    sparse = Dataset(cfg.data).sparse_batches(cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle, epochs=cfg.epochs)
    iterations = cfg.iterations or len(sparse)
    error = None
    server = None
    try:
        server = WorkerServer(args.worker, args.endpoint, run.job_id(), secret, cfg.plan_timeout_s, cfg.max_ahead,
                              cfg.zmq_curve_dir, start=args.first_iteration)
        serve_partitions(cfg, sparse, iterations, args.first_iteration, args.worker, server)
        return 0
    except WorkerError as exc:
        error = str(exc)
        log.error("%s", exc)
        return 1
    except Exception as exc:  # the planner's own errors (a capacity error, a bad batch): the oracle is told
        error = f"{type(exc).__name__}: {exc}"
        log.error("%s", error)
        return 1
    finally:
        if server is not None:
            server.close(error)


if __name__ == "__main__":
    raise SystemExit(main())
