"""The trainer's end of the plan stream: in-order plans from the oracle, credits back."""

from __future__ import annotations

from typing import Callable

import zmq

from bagpipe.curve import secure_client
from bagpipe.wire import (KIND_PLAN, Credit, End, Error, Hello, Plan, decode_control, decode_plan, encode_control,
                          message_kind)


class PlanStreamError(RuntimeError):
    """The oracle stopped, went silent, or ended the stream early (the message says which)."""


class PlanClient:
    """A DEALER connected to the oracle's ROUTER: HELLO once, then one plan in and one credit out per iteration."""

    def __init__(self, endpoint: str, job: str, rank: int, timeout_s: float, curve_dir: str,
                 epoch_of: Callable[[int], int], token: str = "") -> None:
        self.endpoint, self.job, self.rank, self.timeout_s = endpoint, job, rank, timeout_s
        self.epoch_of = epoch_of  # iteration -> the epoch its plan must name
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        secure_client(self.sock, curve_dir)
        self.sock.connect(endpoint)
        self.sock.send_multipart(encode_control(Hello(rank=rank, token=token), job))

    def next_plan(self, iteration: int) -> Plan:
        if not self.sock.poll(int(self.timeout_s * 1000)):
            raise PlanStreamError(f"rank {self.rank}: no plan for iteration {iteration} from the oracle at "
                                  f"{self.endpoint} within {self.timeout_s}s")
        frames = self.sock.recv_multipart(copy=True)
        if message_kind(frames) == KIND_PLAN:
            return decode_plan(frames, self.job, self.rank, iteration, self.epoch_of(iteration))
        msg = decode_control(frames, self.job)
        if isinstance(msg, Error):
            raise PlanStreamError(f"the oracle stopped: {msg.message}")
        if isinstance(msg, End):
            raise PlanStreamError(f"rank {self.rank}: the oracle ended the plan stream before iteration {iteration}")
        raise PlanStreamError(f"rank {self.rank}: the oracle sent {type(msg).__name__}, which only trainers send")

    def credit(self, iteration: int, written_through: int) -> None:
        self.sock.send_multipart(encode_control(Credit(self.rank, iteration, written_through), self.job))

    def error(self, message: str) -> None:
        try:
            self.sock.send_multipart(encode_control(Error(self.rank, message), self.job), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()
