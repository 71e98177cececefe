"""One training iteration on one rank, as a function of (plan, embeddings, batch, model, communicator).

The order, for every policy (``bagpipe.wire.Plan`` states the contract):
install the rows the plan brings in (waiting for them is the *stall*), the
join collective (rows that arrive from another trainer's cache), forward
and backward through the slot cache, one all-reduce carrying the dense
gradients and the gradients of rows several trainers read, the optimizer
steps (dense, then the rows), then the evictions.

``Step`` knows nothing of sockets, Redis or processes: tests drive it with
a ``SoloCommunicator`` or a fake one in-process, and with gloo in two.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from bagpipe.dataset import Batch
from bagpipe.wire import Plan
from trainers.cache import BagLayout, to_device
from trainers.embeddings import Embeddings

# The phases a step is timed in (seconds per iteration in metrics.json; see StepResult.times).
PHASES = ("plan", "install", "join", "forward", "backward", "combine", "optimizer", "evict")


class Communicator:
    """What a step needs of the other ranks: a summing all-reduce (in place) and a barrier."""

    rank: int = 0
    world: int = 1

    def all_reduce(self, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError


class SoloCommunicator(Communicator):
    """One rank: nothing to combine."""

    def all_reduce(self, tensor: torch.Tensor) -> None:
        pass

    def barrier(self) -> None:
        pass


class CollectiveError(RuntimeError):
    """A collective that failed: names the ranks (and nodes) this rank was waiting for."""


class DistCommunicator(Communicator):
    """torch.distributed's default process group (gloo on CPU, nccl on GPU).

    A collective that fails (a peer gone, a link cut: gloo says only "Timed out waiting 20000ms for
    recv operation") is reported naming the ranks it involved and their nodes.
    """

    def __init__(self, ranks_per_node: int | None = None) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.ranks_per_node = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", self.world)) or self.world

    def _lost(self, what: str, exc: BaseException) -> CollectiveError:
        peers = [r for r in range(self.world) if r != self.rank]
        mine = self.rank // self.ranks_per_node
        nodes = sorted({r // self.ranks_per_node for r in peers} - {mine})
        where = f" on node {', '.join(map(str, nodes))}" if nodes else " on this node"
        text = re.sub(r"^\[[^\]]*\]\s*", "", (str(exc).strip().splitlines() or [type(exc).__name__])[0])
        return CollectiveError(f"rank {self.rank} lost rank(s) {', '.join(map(str, peers))}{where} in the {what}: "
                               f"{text} (a peer stopped, or the link to it is cut)")

    def all_reduce(self, tensor: torch.Tensor) -> None:
        try:
            self._all_reduce(tensor)
        except RuntimeError as exc:
            raise self._lost("gradient all-reduce", exc) from None

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        # The sum in rank order, ((g0 + g1) + g2) + ..., whatever the tensor's length: a ring
        # all-reduce adds each chunk starting at another rank, so with three or more ranks an
        # element's bits would depend on where it falls in the buffer (which differs between
        # policies). Gathering and adding in rank order makes N ranks of any policy reduce
        # alike, bit for bit (docs/consistency.md). With two ranks both are a + b (addition commutes
        # exactly), so two ranks keep the ring, which sends half as much.
        if self.world <= 2:
            dist.all_reduce(tensor)
            return
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor)
        tensor.copy_(parts[0])
        for part in parts[1:]:
            tensor.add_(part)

    def barrier(self) -> None:
        try:
            dist.barrier()
        except RuntimeError as exc:
            raise self._lost("barrier", exc) from None


@dataclass
class StepResult:
    loss: float  # this rank's mean loss over its samples
    rows_read: int  # distinct rows this rank read
    rows_fetched: int
    rows_written_back: int
    stall_s: float
    times: dict[str, float] = field(default_factory=dict)  # seconds per phase (PHASES)


class Step:
    """One iteration (see the module docstring). Subclasses change one rule (``trainers.mutants``)."""

    def __init__(self, model: torch.nn.Module, dense_opt: torch.optim.Optimizer, comm: Communicator,
                 table_names: list[str], global_batch: int, device: torch.device,
                 layout: BagLayout | None = None) -> None:
        self.model, self.dense_opt, self.comm = model, dense_opt, comm
        self.table_names, self.global_batch, self.device = table_names, global_batch, device
        # How the plan's slots form bags (one-hot, summed, unless the data says otherwise).
        self.layout = layout or BagLayout(table_names, [1] * len(table_names), ["sum"] * len(table_names))
        self.dense_params = list(model.parameters())
        # On CUDA a phase's kernels are queued, not run, when its clock stops: the times say where the
        # host spends its time. BAGPIPE_SYNC_TIMERS=1 makes each clock wait for the device first (one
        # synchronisation per phase, for profiling: it takes away the overlap it measures).
        self.sync_timers = device.type == "cuda" and os.environ.get("BAGPIPE_SYNC_TIMERS") == "1"

    def _synced_clock(self) -> float:
        torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __call__(self, i: int, plan: Plan, emb: Embeddings, batch: Batch) -> StepResult:
        dev = self.device
        clock = self._synced_clock if self.sync_timers else time.perf_counter
        times = {}
        t = clock()
        stall = emb.install(plan)
        times["install"], t = clock() - t, clock()
        if plan.n_join:
            self.join(plan, emb)
        times["join"], t = clock() - t, clock()
        dense = to_device(batch.dense, dev)
        labels = to_device(batch.labels, dev)
        read_slots = to_device(plan.read_slots.astype(np.int64), dev)
        kt, leaf, uniq = self.layout.lookup(emb.cache, read_slots, batch.sparse)
        logits = self.model(dense, kt)
        # Sum over the local batch / global batch: summed over ranks this is the global mean.
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / self.global_batch
        times["forward"], t = clock() - t, clock()
        self.dense_opt.zero_grad(set_to_none=False)
        loss.backward()
        times["backward"], t = clock() - t, clock()
        slots, grads = self.combine(plan, uniq, leaf.grad)
        times["combine"], t = clock() - t, clock()
        self.dense_opt.step()
        emb.cache.apply_gradients(slots, grads)
        emb.updated(slots)
        times["optimizer"], t = clock() - t, clock()
        written = emb.after_step(i, plan)
        times["evict"] = clock() - t
        return StepResult(loss=float(loss.detach()) * self.global_batch / len(batch.labels), rows_read=int(uniq.numel()),
                          rows_fetched=len(plan.fetch_keys), rows_written_back=written, stall_s=stall, times=times)

    def join(self, plan: Plan, emb: Embeddings) -> None:
        """Rows joined this iteration: holders contribute each row's value, joiners receive it.

        A separate collective before the forward pass, because a joined row may
        be read in this very iteration (a fetch the oracle had to defer to the
        last moment): it must hold the value from before this iteration's update.
        """
        dev, cache = self.device, emb.cache
        buf = torch.zeros(plan.n_join, cache.width, device=dev)
        send = to_device(plan.join_send.astype(bool), dev)
        join_pos = to_device(plan.join_pos.astype(np.int64), dev)
        join_slots = to_device(plan.join_slots.astype(np.int64), dev)
        if send.any():
            buf[join_pos[send]] = cache.read(join_slots[send])
        self.comm.all_reduce(buf)
        recv = ~send
        if recv.any():
            cache.write(join_slots[recv], buf[join_pos[recv]])

    def combine(self, plan: Plan, uniq: torch.Tensor, local_grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All-reduce dense gradients and shared rows' gradients; return the rows to update and their gradients."""
        if self.comm.world == 1:
            return uniq, local_grads
        dev, dim = self.device, local_grads.shape[1]
        dense_grads = [p.grad.reshape(-1) for p in self.dense_params]
        n_dense = sum(g.numel() for g in dense_grads)
        buf = torch.zeros(n_dense + plan.n_sync * dim, device=dev)
        buf[:n_dense] = torch.cat(dense_grads)
        sync_pos = to_device(plan.sync_pos.astype(np.int64), dev)
        sync_slots = to_device(plan.sync_slots.astype(np.int64), dev)
        # Position of each synced slot among this iteration's distinct local rows (-1: not read here).
        where = torch.searchsorted(uniq, sync_slots)
        where = torch.clamp(where, max=max(0, len(uniq) - 1))
        hit = (uniq[where] == sync_slots) if len(uniq) else torch.zeros_like(sync_slots, dtype=torch.bool)
        sync_view = buf[n_dense:n_dense + plan.n_sync * dim].view(plan.n_sync, dim)
        if hit.any():
            sync_view[sync_pos[hit]] = local_grads[where[hit]]
        self.comm.all_reduce(buf)
        offset = 0
        for p in self.dense_params:
            p.grad.copy_(buf[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return self.rows_to_update(uniq, local_grads, sync_slots, sync_view[sync_pos])

    def rows_to_update(self, uniq: torch.Tensor, local_grads: torch.Tensor, sync_slots: torch.Tensor,
                       sync_grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local rows with their own gradients, then synced rows with the sums."""
        local = ~_isin(uniq, sync_slots)
        return torch.cat([uniq[local], sync_slots]), torch.cat([local_grads[local], sync_grads])


class SkipSyncStep(Step):
    """Planted bug (``trainers.mutants``): every rank updates its rows with its own gradients only."""

    def rows_to_update(self, uniq, local_grads, sync_slots, sync_grads):
        return uniq, local_grads


def _isin(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if b.numel() == 0:
        return torch.zeros_like(a, dtype=torch.bool)
    return torch.isin(a, b)
