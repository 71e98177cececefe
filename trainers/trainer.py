"""One trainer rank, started by torchrun: plans in, cached embeddings, data-parallel dense model.

Per iteration i (see ``bagpipe.wire.Plan`` for the contract):
issue the plan's fetches (background), install the rows due now (waiting
here is the *stall*), forward and backward through the slot cache, one
all-reduce carrying dense gradients, the gradients of shared rows and the
rows joined this iteration, the optimizer steps, then evictions handed to
the background writer and a credit back to the oracle.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import zmq

from bagpipe.checkpoint import Checkpoints, fingerprint, load_manifest, read_rows
from bagpipe.config import RunConfig
from bagpipe.curve import secure_client
from bagpipe.keys import initial_rows, key_row, key_table
from bagpipe.log import init_logger
from bagpipe.procs import die_with_parent
from bagpipe.wire import KIND_END, KIND_ERROR, KIND_HELLO, KIND_CREDIT, Plan, WireError, decode_control, decode_plan, encode_control
from oracle.planner import batch_keys
from trainers.cache import SlotCache, slots_kjt
from trainers.models import build_dense_model

log = logging.getLogger("bagpipe")


class TrainerError(RuntimeError):
    pass


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainerError("config key 'device': cuda requested but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


class PlanClient:
    """The trainer's end of the plan stream: in-order plans, credits back."""

    def __init__(self, endpoint: str, job: str, rank: int, timeout_s: float, curve_dir: str,
                 epoch_of: Callable[[int], int]) -> None:
        self.endpoint, self.job, self.rank, self.timeout_s = endpoint, job, rank, timeout_s
        self.epoch_of = epoch_of  # iteration -> the epoch its plan must name
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        secure_client(self.sock, curve_dir)
        self.sock.connect(endpoint)
        self.sock.send_multipart(encode_control(KIND_HELLO, job, rank=rank))

    def next_plan(self, iteration: int) -> Plan:
        if not self.sock.poll(int(self.timeout_s * 1000)):
            raise TrainerError(f"rank {self.rank}: no plan for iteration {iteration} from the oracle at "
                               f"{self.endpoint} within {self.timeout_s}s")
        frames = self.sock.recv_multipart(copy=True)
        kind = bytes(frames[0])
        if kind == KIND_ERROR:
            _, header = decode_control(frames, self.job)
            raise TrainerError(f"the oracle stopped: {header.get('message', '')}")
        if kind == KIND_END:
            raise TrainerError(f"rank {self.rank}: the oracle ended the plan stream before iteration {iteration}")
        return decode_plan(frames, self.job, self.rank, iteration, self.epoch_of(iteration))

    def credit(self, iteration: int, written_through: int) -> None:
        self.sock.send_multipart(encode_control(KIND_CREDIT, self.job, rank=self.rank, iteration=iteration,
                                                written_through=written_through))

    def error(self, message: str) -> None:
        try:
            self.sock.send_multipart(encode_control(KIND_ERROR, self.job, rank=self.rank, message=message[:500]),
                                     flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


class LocalPlans:
    """Policy ``local``: every row of every table lives in the trainer (slot = table offset + row)."""

    def __init__(self, offsets: np.ndarray, sparse, rank: int, world: int, local_b: int) -> None:
        self.offsets, self.sparse, self.rank, self.world, self.local_b = offsets, sparse, rank, world, local_b

    def slots(self, keys: np.ndarray) -> np.ndarray:
        return (self.offsets[key_table(keys)] + key_row(keys)).astype(np.int32)

    def next_plan(self, iteration: int) -> Plan:
        keys = batch_keys(self.sparse[iteration])
        mine = keys[self.rank * self.local_b:(self.rank + 1) * self.local_b]
        plan = Plan.empty(iteration, self.rank, self.local_b, keys.shape[1])
        plan.read_slots = self.slots(mine)
        if self.world > 1:
            # Every trainer holds every row: all rows used by anyone are synced.
            used = np.unique(keys)
            plan.sync_pos = np.arange(len(used), dtype=np.int32)
            plan.sync_slots = self.slots(used)
            plan.n_sync = len(used)
        return plan


class BatchPrefetcher:
    """Reads batch i+1 in a background thread while batch i trains.

    The reader loads a shuffle window (about a million rows) every so often;
    ahead of time, that load costs no training time. Only this thread touches
    the reader, so its caches need no lock.
    """

    def __init__(self, reader, last: int) -> None:
        self.reader, self.last = reader, last
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self.pending: dict[int, Future] = {}

    def get(self, i: int):
        future = self.pending.pop(i, None) or self.pool.submit(self.reader.__getitem__, i)
        if i + 1 <= self.last and i + 1 not in self.pending:
            self.pending[i + 1] = self.pool.submit(self.reader.__getitem__, i + 1)
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Meters:
    stall_s: float = 0.0
    paused_s: float = 0.0  # checkpoints and evaluations during training
    compute_s: float = 0.0
    comm_s: float = 0.0
    rows_fetched: int = 0
    rows_written_back: int = 0
    rows_read: int = 0
    rows_read_installed_now: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    stall_per_iteration: list = field(default_factory=list)
    ended_at: list = field(default_factory=list)


class Trainer:
    """The training loop of one rank."""

    def __init__(self, cfg: RunConfig, run_dir: Path, rank: int, world: int, start: int = 0) -> None:
        from data.reader import Dataset

        self.cfg, self.run_dir, self.rank, self.world = cfg, run_dir, rank, world
        self.start = start  # first iteration of this launch (> 0: resumed from a checkpoint)
        self.device = pick_device(cfg.device)
        self.dataset = Dataset(cfg.data)
        self.table_names = [name for name, _ in self.dataset.tables]
        self.table_sizes = np.array([n for _, n in self.dataset.tables], dtype=np.int64)
        self.local_b = cfg.batch_size // world
        self.reader = self.dataset.batches(cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle,
                                           world_size=world, rank=rank, epochs=cfg.epochs)
        self.iterations = cfg.iterations or len(self.reader)
        self.batches = BatchPrefetcher(self.reader, self.iterations - 1)
        if self.iterations > len(self.reader):
            raise TrainerError(f"config key 'iterations': {self.iterations} > {len(self.reader)} full batches "
                               f"in {cfg.epochs} epoch(s) of {cfg.data}")
        torch.manual_seed(cfg.seed)  # identical dense initial weights on every rank
        self.model = build_dense_model(cfg.model_config(), self.dataset.num_dense, len(self.table_names)).to(self.device)
        self.dense_params = [p for p in self.model.parameters()]
        self.dense_opt = torch.optim.Adagrad(self.dense_params, lr=cfg.dense_lr)
        self.meters = Meters()
        self.eval_history: list[dict] = []
        # Planted bug for `bagpipe check` (never set in normal runs).
        self.mutant_skip_sync = os.environ.get("BAGPIPE_MUTANT") == "skip-sync"
        self.store = None
        self.io = None
        self.client = None
        dim, sw = cfg.embedding_dim, cfg.state_width
        if cfg.policy == "local":
            self.offsets = np.concatenate([[0], np.cumsum(self.table_sizes)[:-1]]).astype(np.int64)
            total = int(self.table_sizes.sum())
            self.cache = SlotCache(total, dim, sw, self.device, cfg.optimizer, cfg.lr, cfg.eps)
            self._init_local_tables()
            sparse = self.dataset.sparse_batches(cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle, epochs=cfg.epochs)
            self.plans = LocalPlans(self.offsets, sparse, rank, world, self.local_b)
            self.touched = torch.zeros(total, dtype=torch.bool)
        else:
            from bagpipe.store import EmbeddingStore
            from trainers.storeio import StoreIO

            endpoints = json.loads((run_dir / "endpoints.json").read_text())
            self.store = EmbeddingStore(cfg.store_config(endpoints.get("redis_cluster_url")), endpoints["redis"],
                                        dim, sw, self.table_sizes.tolist())
            self.io = StoreIO(self.store, wait_timeout_s=cfg.plan_timeout_s)
            self.cache = SlotCache(cfg.cache_rows if cfg.policy not in ("none", "bagpipe-original") else 1024,
                                   dim, sw, self.device, cfg.optimizer, cfg.lr, cfg.eps)
            job = (run_dir / "job_id").read_text().strip()
            self.client = PlanClient(endpoints["oracle"], job, rank, cfg.plan_timeout_s, cfg.zmq_curve_dir,
                                     self.reader.epoch_of)
            self.plans = self.client
        if start > 0:
            self._restore()

    def _init_local_tables(self) -> None:
        offset = 0
        for t, n in enumerate(self.table_sizes.tolist()):
            for start in range(0, n, 1 << 20):
                rows = np.arange(start, min(n, start + (1 << 20)), dtype=np.int64)
                keys = (np.int64(t) << 40) | rows
                vals = initial_rows(keys, self.cfg.embedding_dim, self.cfg.state_width, self.cfg.seed, self.table_sizes)
                self.cache.rows[offset + start: offset + start + len(rows)] = torch.from_numpy(vals).to(self.device)
            offset += n

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        cfg = self.cfg
        started = time.perf_counter()
        report_every = max(1, self.iterations // 20)
        for i in range(self.start, self.iterations):
            plan = self.plans.next_plan(i)
            self.step(i, plan)
            if self.client is not None:
                self.client.credit(i, self.io.written_through)
            if cfg.flushes_after(i, self.iterations):
                self._segment_end(i)
            # When each iteration ended, in training time (checkpoints and evaluations left out).
            self.meters.ended_at.append(time.perf_counter() - started - self.meters.paused_s)
            if self.rank == 0 and (i + 1) % report_every == 0:
                m = self.meters
                el = time.perf_counter() - started - m.paused_s
                # Hit rate: distinct rows read that needed no fetch of their own.
                hits = max(0.0, 1.0 - m.rows_fetched / max(1, m.rows_read)) if self.io is not None else 1.0
                log.info("iteration %d/%d  %.0f samples/s  loss %.4f  hit rate %.1f%%  stalled %.2fs", i + 1,
                         self.iterations, (i + 1 - self.start) * cfg.batch_size / el,
                         m.loss_sum / max(1, m.loss_n), 100 * hits, m.stall_s)
        if self.io is not None:
            self.io.drain()
        self.wall_s = time.perf_counter() - started - self.meters.paused_s

    # ------------------------------------------------------------ checkpoints
    def _fingerprint(self) -> dict:
        return fingerprint(self.cfg.to_dict(), self.dataset.meta.get("content_hash", ""))

    def _segment_end(self, i: int) -> None:
        """After the oracle's last plan of a segment every cached row has been evicted and
        handed to the writer: draining the writer on every rank, then a barrier, means the
        store holds every row's value after i. Checkpoints and evaluations happen here."""
        cfg = self.cfg
        if self.io is not None:
            self.io.drain()
        if self.world > 1:
            dist.barrier()
        t0 = time.perf_counter()  # checkpoints and evaluations are not training time
        if cfg.checkpoints_after(i, self.iterations):
            self.checkpoint(i)
        if cfg.evaluates_after(i, self.iterations) and self.rank == 0:
            result = self.evaluate()
            if result:
                self.eval_history.append(dict(result, iteration=i))
                log.info("eval after iteration %d: AUC %.4f, logloss %.4f", i, result["eval_auc"],
                         result["eval_logloss"])
        if self.world > 1:
            dist.barrier()
        self.meters.paused_s += time.perf_counter() - t0

    def checkpoint(self, i: int) -> None:
        """Checkpoint after iteration i (at a segment end): embeddings, optimizer state and dense state."""
        t0 = time.perf_counter()
        if self.rank == 0:
            dense = {"model": self.model.state_dict(), "optimizer": self.dense_opt.state_dict(),
                     "torch_rng": torch.get_rng_state(), "iteration": i}
            path = Checkpoints(self.run_dir).write(i, self._fingerprint(), dense, self._stored_rows())
            log.info("checkpoint after iteration %d: %s (%.2fs)", i, path.name, time.perf_counter() - t0)

    def _stored_rows(self):
        """Every row changed so far, in chunks of (keys, values)."""
        if self.cfg.policy != "local":
            yield from self.store.scan_rows()
            return
        idx = torch.nonzero(self.touched).squeeze(1).numpy()
        for lo in range(0, len(idx), 1 << 18):
            part = idx[lo:lo + (1 << 18)]
            table = np.searchsorted(self.offsets, part, side="right") - 1
            keys = (table.astype(np.int64) << 40) | (part - self.offsets[table])
            yield keys, self.cache.rows[torch.from_numpy(part).to(self.device)].cpu().numpy()

    def _restore(self) -> None:
        """Dense state from the latest checkpoint; ``local`` also takes its rows from it (others: the store)."""
        path = Checkpoints(self.run_dir).latest()
        if path is None:
            raise TrainerError(f"no checkpoint in {self.run_dir} to resume from")
        manifest = load_manifest(path, self._fingerprint())
        if manifest["iteration"] != self.start - 1:
            raise TrainerError(f"checkpoint {path.name} is after iteration {manifest['iteration']}, "
                               f"expected {self.start - 1}")
        dense = torch.load(path / "dense.pt", map_location=self.device, weights_only=True)
        self.model.load_state_dict(dense["model"])
        self.dense_opt.load_state_dict(dense["optimizer"])
        torch.set_rng_state(dense["torch_rng"])
        if self.cfg.policy == "local":
            for keys, values in read_rows(path):
                slots = torch.from_numpy(self.offsets[key_table(keys)] + key_row(keys))
                self.cache.write(slots.to(self.device), torch.from_numpy(values).to(self.device))
                self.touched[slots] = True

    def step(self, i: int, plan: Plan) -> None:
        m = self.meters
        dev = self.device
        if self.io is not None:
            self.cache.ensure_slots(plan.slots_needed)
            self.io.fetch(plan.first_fetch_id, plan.fetch_keys, plan.fetch_versions)
            t0 = time.perf_counter()
            rows = self.io.take(plan.install_ids)
            stall = time.perf_counter() - t0
            m.stall_s += stall
            m.stall_per_iteration.append(stall)
            self.cache.write(torch.from_numpy(plan.install_slots.astype(np.int64)).to(dev),
                             torch.from_numpy(rows).to(dev))
        if plan.n_join:
            self._join(plan)
        t1 = time.perf_counter()
        batch = self.batches.get(i)
        dense = torch.from_numpy(batch.dense).to(dev)
        labels = torch.from_numpy(batch.labels).to(dev)
        read_slots = torch.from_numpy(plan.read_slots.astype(np.int64)).to(dev)
        kt, leaf, uniq = self.cache.lookup(slots_kjt(self.table_names, read_slots))
        m.rows_read += int(uniq.numel())
        logits = self.model(dense, kt)
        # Sum over the local batch / global batch: summed over ranks this is the global mean.
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / self.cfg.batch_size
        self.dense_opt.zero_grad(set_to_none=False)
        loss.backward()
        m.loss_sum += float(loss) * self.cfg.batch_size / self.local_b
        m.loss_n += 1
        grads = leaf.grad
        slots, grads = self._combine(plan, uniq, grads)
        self.dense_opt.step()
        self.cache.apply_gradients(slots, grads)
        if self.cfg.policy == "local":
            # Every row updated here, including rows only other ranks read (synced).
            self.touched[slots.cpu()] = True
        m.compute_s += time.perf_counter() - t1
        if self.io is not None:
            self._evict(i, plan)

    def _join(self, plan: Plan) -> None:
        """Rows joined this iteration: holders contribute each row's value, joiners receive it.

        A separate collective before the forward pass, because a joined row may
        be read in this very iteration (a fetch the oracle had to defer to the
        last moment): it must hold the value from before this iteration's update.
        """
        dev, width = self.device, self.cache.width
        t0 = time.perf_counter()
        buf = torch.zeros(plan.n_join, width, device=dev)
        send = torch.from_numpy(plan.join_send.astype(bool)).to(dev)
        join_pos = torch.from_numpy(plan.join_pos.astype(np.int64)).to(dev)
        join_slots = torch.from_numpy(plan.join_slots.astype(np.int64)).to(dev)
        if send.any():
            buf[join_pos[send]] = self.cache.read(join_slots[send])
        dist.all_reduce(buf)
        recv = ~send
        if recv.any():
            self.cache.write(join_slots[recv], buf[join_pos[recv]])
        self.meters.comm_s += time.perf_counter() - t0

    def _combine(self, plan: Plan, uniq: torch.Tensor, local_grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All-reduce dense gradients, shared rows' gradients and joined rows; return the rows to update."""
        if self.world == 1:
            return uniq, local_grads
        dev, dim = self.device, self.cfg.embedding_dim
        t0 = time.perf_counter()
        dense_grads = [p.grad.reshape(-1) for p in self.dense_params]
        n_dense = sum(g.numel() for g in dense_grads)
        buf = torch.zeros(n_dense + plan.n_sync * dim, device=dev)
        buf[:n_dense] = torch.cat(dense_grads)
        sync_pos = torch.from_numpy(plan.sync_pos.astype(np.int64)).to(dev)
        sync_slots = torch.from_numpy(plan.sync_slots.astype(np.int64)).to(dev)
        # Position of each synced slot among this iteration's distinct local rows (-1: not read here).
        where = torch.searchsorted(uniq, sync_slots)
        where = torch.clamp(where, max=max(0, len(uniq) - 1))
        hit = (uniq[where] == sync_slots) if len(uniq) else torch.zeros_like(sync_slots, dtype=torch.bool)
        sync_view = buf[n_dense:n_dense + plan.n_sync * dim].view(plan.n_sync, dim)
        if hit.any():
            sync_view[sync_pos[hit]] = local_grads[where[hit]]
        dist.all_reduce(buf)
        self.meters.comm_s += time.perf_counter() - t0
        offset = 0
        for p in self.dense_params:
            p.grad.copy_(buf[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        if self.mutant_skip_sync:
            return uniq, local_grads
        # Rows to update: local rows with their own gradients, then synced rows with the sums.
        slots = torch.cat([uniq[~_isin(uniq, sync_slots)], sync_slots])
        grads = torch.cat([local_grads[~_isin(uniq, sync_slots)], sync_view[sync_pos]])
        return slots, grads

    def _evict(self, i: int, plan: Plan) -> None:
        write = plan.evict_write.astype(bool)
        if write.any():
            slots = torch.from_numpy(plan.evict_slots[write].astype(np.int64)).to(self.device)
            values = self.cache.read(slots).cpu().numpy()
            self.io.write_back(plan.evict_keys[write], values, i)
            self.meters.rows_written_back += int(write.sum())
        self.meters.rows_fetched += len(plan.fetch_keys)
        self.io.mark_iteration(i)

    # ------------------------------------------------------------ results
    def rows_for(self, keys: np.ndarray) -> np.ndarray:
        """Final values of rows (after the run): from the tables (local) or the store."""
        if self.cfg.policy == "local":
            slots = torch.from_numpy(self.offsets[key_table(keys)] + key_row(keys))
            return self.cache.rows[slots.to(self.device)].cpu().numpy()
        values, _ = self.store.get(keys)
        return values

    @torch.no_grad()
    def evaluate(self) -> dict:
        """AUC and logloss on the eval split, after every cache has been flushed."""
        if self.dataset.num_rows("eval") < self.cfg.batch_size // self.world:
            return {}
        reader = self.dataset.batches(self.local_b, seed=self.cfg.seed, shuffle=False, split="eval")
        scores, labels = [], []
        for j in range(min(len(reader), self.cfg.eval_batches)):
            batch = reader[j]
            keys = batch_keys(batch.sparse)
            uniq, inv = np.unique(keys, return_inverse=True)
            tmp = SlotCache(len(uniq), self.cfg.embedding_dim, self.cfg.state_width, self.device,
                            self.cfg.optimizer, self.cfg.lr, self.cfg.eps)
            tmp.rows[:] = torch.from_numpy(self.rows_for(uniq)).to(self.device)
            slots = torch.from_numpy(inv.reshape(keys.shape).astype(np.int64)).to(self.device)
            kt, _, _ = tmp.lookup(slots_kjt(self.table_names, slots))
            logits = self.model(torch.from_numpy(batch.dense).to(self.device), kt)
            scores.append(torch.sigmoid(logits).cpu().numpy())
            labels.append(batch.labels)
        s, y = np.concatenate(scores), np.concatenate(labels)
        eps = 1e-7
        logloss = float(-np.mean(y * np.log(s + eps) + (1 - y) * np.log(1 - s + eps)))
        return {"eval_auc": auc(y, s), "eval_logloss": logloss, "eval_samples": int(len(y))}

    def export_rows(self) -> dict:
        """Per table: ids of every row touched and their final values (embedding and state)."""
        if self.cfg.policy == "local":
            idx = torch.nonzero(self.touched).squeeze(1).numpy()
            table = np.searchsorted(self.offsets, idx, side="right") - 1
            keys = (table.astype(np.int64) << 40) | (idx - self.offsets[table])
            values = self.cache.rows[torch.from_numpy(idx).to(self.device)].cpu().numpy()
        else:
            chunks = list(self.store.scan_rows())
            keys = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.int64)
            values = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros((0, self.cache.width), np.float32)
        out = {}
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], values[order]
        tables = key_table(keys)
        for t, name in enumerate(self.table_names):
            sel = tables == t
            out[name] = {"ids": torch.from_numpy(key_row(keys[sel]).copy()),
                         "weights": torch.from_numpy(values[sel, :self.cfg.embedding_dim].copy()),
                         "state": torch.from_numpy(values[sel, self.cfg.embedding_dim:].copy())}
        return out

    def close(self) -> None:
        self.batches.close()
        if self.io is not None:
            self.io.close()
        if self.client is not None:
            self.client.close()
        if self.store is not None:
            self.store.close()


def _isin(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if b.numel() == 0:
        return torch.zeros_like(a, dtype=torch.bool)
    return torch.isin(a, b)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank statistic (ties averaged)."""
    labels = labels.astype(bool)
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return 0.5
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagpipe trainer", description="one trainer rank (under torchrun)")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--first-iteration", type=int, default=0, help="first iteration (a resumed run)")
    args = parser.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    init_logger(f"trainer {rank}")
    die_with_parent()  # torchrun killed outright must not leave ranks waiting for plans
    (args.run_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    cfg = RunConfig.from_dict(json.loads((args.run_dir / "config.json").read_text()))
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(cfg.trainer_threads or max(1, (os.cpu_count() or 2) // max(1, world)))
    backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
    if world > 1:
        dist.init_process_group(backend=backend)
    trainer = None
    try:
        trainer = Trainer(cfg, args.run_dir, rank, world, start=args.first_iteration)
        trainer.train()
        if world > 1:
            dist.barrier()  # every rank's write-backs have landed before anyone reads the store
        result = {"rank": rank, "wall_s": trainer.wall_s, "iterations": trainer.iterations, "start": trainer.start,
                  "stall_s": trainer.meters.stall_s, "compute_s": trainer.meters.compute_s,
                  "comm_s": trainer.meters.comm_s, "rows_fetched": trainer.meters.rows_fetched,
                  "rows_written_back": trainer.meters.rows_written_back,
                  "train_logloss": trainer.meters.loss_sum / max(1, trainer.meters.loss_n),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "stall_per_iteration": trainer.meters.stall_per_iteration,
                  "ended_at": trainer.meters.ended_at}
        if rank == 0:
            final = trainer.evaluate()
            result.update(final)
            history = trainer.eval_history + ([dict(final, iteration=trainer.iterations - 1)] if final else [])
            result["eval_history"] = history
            model = {"dense": trainer.model.state_dict(), "tables": trainer.export_rows(),
                     "config": cfg.to_dict()}
            tmp = args.run_dir / "model.pt.tmp"
            torch.save(model, tmp)
            os.replace(tmp, args.run_dir / "model.pt")
        tmp = args.run_dir / f"rank{rank}.json.tmp"
        tmp.write_text(json.dumps(result))
        os.replace(tmp, args.run_dir / f"rank{rank}.json")
        return 0
    except Exception as exc:
        log.error("rank %d failed: %s", rank, exc)
        if trainer is not None and trainer.client is not None:
            trainer.client.error(f"rank {rank}: {exc}")
        raise
    finally:
        if trainer is not None:
            trainer.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
