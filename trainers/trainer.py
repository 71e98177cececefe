"""One trainer rank, started by torchrun: the training loop around ``Step``, checkpoints, evaluation.

The shell (``Trainer``) owns what lives as long as the rank: the batch
reader, the model and its optimizer, the embeddings (``LocalEmbeddings`` or
``CachedEmbeddings``: the trainer never asks which policy runs) and the
step. Per iteration it takes the plan, the batch, runs ``Step`` and keeps
the meters; at segment ends (``RunConfig.segment_end``) it flushes the
store traffic and checkpoints or evaluates. ``main`` reads the run
directory, builds the trainer (``build``), trains, writes the results.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from bagpipe.auth import AuthError, read_secret
from bagpipe.checkpoint import Checkpoints, fingerprint, load_manifest, read_rows
from bagpipe.config import RunConfig
from bagpipe.dataset import Dataset
from bagpipe.keys import batch_keys, key_row, key_table
from bagpipe.log import init_logger
from bagpipe.metrics import evaluation
from bagpipe.placement import Placement
from bagpipe.procs import die_with_parent
from bagpipe.rendezvous import SESSION_ENV, RendezvousError, trainers_store
from bagpipe.rundir import RunDir
from trainers.cache import BagLayout, SlotCache
from trainers.embeddings import CachedEmbeddings, Embeddings, LocalEmbeddings
from trainers.models import build_dense_model
from trainers.reporting import rank0_sinks
from trainers.step import PHASES, Communicator, DistCommunicator, SoloCommunicator, Step

log = logging.getLogger("bagpipe")


class TrainerError(RuntimeError):
    pass


def pick_device(setting: str, environ=os.environ) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK, or the CPU.

    Each rank on a node needs a GPU of its own (nccl refuses two ranks on one
    device), so ``auto`` takes CUDA only when there are as many GPUs as local
    ranks (torchrun's LOCAL_WORLD_SIZE), and ``cuda`` with too few is an error.
    """
    if setting == "cpu":
        return torch.device("cpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local_rank, local_world = int(environ.get("LOCAL_RANK", 0)), int(environ.get("LOCAL_WORLD_SIZE", 1))
    if gpus >= local_world:
        return torch.device("cuda", local_rank)
    if setting == "cuda":
        raise TrainerError("config key 'device': cuda requested but CUDA is not available" if not gpus else
                           f"config key 'device': cuda for {local_world} trainers on this node, but "
                           f"{gpus} GPU(s) are visible (each trainer needs its own; set trainers <= {gpus})")
    return torch.device("cpu")


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
    compute_s: float = 0.0  # forward, backward, combine, optimizer
    comm_s: float = 0.0  # the collectives (join and combine)
    rows_fetched: int = 0
    rows_written_back: int = 0
    rows_read: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    phase_s: dict = field(default_factory=lambda: {p: 0.0 for p in PHASES})  # seconds per phase, summed
    # Seconds per phase, one entry per iteration: the runner reports the steady-state mean from
    # these (the first plan waits for the oracle to start, which a whole-run mean would smear).
    phase_per_iteration: dict = field(default_factory=lambda: {p: [] for p in PHASES})
    loss_per_iteration: list = field(default_factory=list)
    stall_per_iteration: list = field(default_factory=list)
    ended_at: list = field(default_factory=list)

    def add(self, result, plan_s: float) -> None:
        self.stall_s += result.stall_s
        self.stall_per_iteration.append(result.stall_s)
        self.rows_read += result.rows_read
        self.rows_fetched += result.rows_fetched
        self.rows_written_back += result.rows_written_back
        self.loss_sum += result.loss
        self.loss_n += 1
        t = result.times
        self.phase_s["plan"] += plan_s
        self.phase_per_iteration["plan"].append(plan_s)
        for phase, seconds in t.items():
            self.phase_s[phase] += seconds
            self.phase_per_iteration[phase].append(seconds)
        self.compute_s += t["forward"] + t["backward"] + t["combine"] + t["optimizer"]
        self.comm_s += t["join"] + t["combine"]

    def hit_rate(self) -> float:
        """Distinct rows read that needed no fetch of their own."""
        return max(0.0, 1.0 - self.rows_fetched / max(1, self.rows_read))


class Trainer:
    """The training loop of one rank (see the module docstring). Built by ``build``."""

    def __init__(self, cfg: RunConfig, run: RunDir, dataset: Dataset, comm: Communicator, start: int,
                 device: torch.device, model: torch.nn.Module, embeddings: Embeddings, step_cls: type[Step],
                 reader, iterations: int) -> None:
        self.cfg, self.run, self.dataset, self.comm = cfg, run, dataset, comm
        self.rank, self.world = comm.rank, comm.world
        self.start = start  # first iteration of this launch (> 0: resumed from a checkpoint)
        self.device, self.model, self.emb = device, model, embeddings
        self.table_names = [name for name, _ in dataset.tables]
        self.local_b = cfg.local_batch
        self.reader, self.iterations = reader, iterations
        self.batches = BatchPrefetcher(reader, iterations - 1)
        self.dense_opt = torch.optim.Adagrad(list(model.parameters()), lr=cfg.dense_lr)
        self.layout = BagLayout(self.table_names, dataset.bags, cfg.model_config().pooling_per_table(len(dataset.tables)))
        self.step = step_cls(model, self.dense_opt, comm, self.table_names, cfg.batch_size, device, self.layout)
        self.meters = Meters()
        self.eval_history: list[dict] = []
        self.sinks = rank0_sinks(run, iterations, cfg.tensorboard) if comm.rank == 0 else None
        self.wall_s = 0.0
        if start > 0:
            self._restore()

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        cfg = self.cfg
        started = time.perf_counter()
        m = self.meters
        for i in range(self.start, self.iterations):
            t0 = time.perf_counter()
            plan = self.emb.next_plan(i)
            plan_s = time.perf_counter() - t0
            if i == self.start and self.rank == 0 and plan_s > 1.0:
                log.info("first plan after %.1fs (the oracle starting and compiling its kernels; not counted "
                         "in the steady rate)", plan_s)
            result = self.step(i, plan, self.emb, self.batches.get(i))
            m.add(result, plan_s)
            m.loss_per_iteration.append(result.loss)
            if cfg.flushes_after(i, self.iterations):
                self._segment_end(i)
            # When each iteration ended, in training time (checkpoints and evaluations left out).
            m.ended_at.append(time.perf_counter() - started - m.paused_s)
            if self.sinks is not None:
                self.sinks.log(self._progress(i), i)
        self.emb.flush()
        self.wall_s = time.perf_counter() - started - m.paused_s

    def _progress(self, i: int) -> dict:
        """Rank 0's figures after iteration i. The rate is the steady one: from the end of this
        launch's first iteration (start-up and the first plan left out) to now."""
        m, done = self.meters, len(self.meters.ended_at)
        span = m.ended_at[-1] - m.ended_at[0]
        rate = (done - 1) * self.cfg.batch_size / span if done > 1 and span > 0 else 0.0
        left = self.iterations - (i + 1)
        return {"train/loss": m.loss_per_iteration[-1], "train/loss_mean": m.loss_sum / max(1, m.loss_n),
                "train/samples_per_s": rate, "train/hit_rate": m.hit_rate() if self.emb.fetches else 1.0,
                "train/stall_s": m.stall_s, "train/eta_s": left * self.cfg.batch_size / rate if rate else 0.0}

    # ------------------------------------------------------------ checkpoints
    def _fingerprint(self) -> dict:
        return fingerprint(self.cfg.to_dict(), self.dataset.meta.get("content_hash", ""))

    def _segment_end(self, i: int) -> None:
        """After the oracle's last plan of a segment every cached row has been evicted and
        handed to the writer: flushing on every rank, then a barrier, means the store holds
        every row's value after i. Checkpoints and evaluations happen here."""
        cfg = self.cfg
        self.emb.flush()
        self.comm.barrier()
        t0 = time.perf_counter()  # checkpoints and evaluations are not training time
        if cfg.checkpoints_after(i, self.iterations):
            self.checkpoint(i)
        if cfg.evaluates_after(i, self.iterations) and self.rank == 0:
            self._evaluate_and_log(i)
        self.comm.barrier()
        self.meters.paused_s += time.perf_counter() - t0

    def checkpoint(self, i: int) -> None:
        """Checkpoint after iteration i (at a segment end): embeddings, optimizer state and dense state."""
        t0 = time.perf_counter()
        if self.rank == 0:
            dense = {"model": self.model.state_dict(), "optimizer": self.dense_opt.state_dict(),
                     "torch_rng": torch.get_rng_state(), "iteration": i}
            path = Checkpoints(self.run.path).write(i, self._fingerprint(), dense, self.emb.touched_rows())
            log.info("checkpoint after iteration %d: %s (%.2fs)", i, path.name, time.perf_counter() - t0)

    def _restore(self) -> None:
        """Dense state from the latest checkpoint; ``local`` also takes its rows from it (others: the store)."""
        path = Checkpoints(self.run.path).latest()
        if path is None:
            raise TrainerError(f"no checkpoint in {self.run.path} to resume from")
        manifest = load_manifest(path, self._fingerprint())
        if manifest["iteration"] != self.start - 1:
            raise TrainerError(f"checkpoint {path.name} is after iteration {manifest['iteration']}, "
                               f"expected {self.start - 1}")
        dense = torch.load(path / "dense.pt", map_location=self.device, weights_only=True)
        self.model.load_state_dict(dense["model"])
        self.dense_opt.load_state_dict(dense["optimizer"])
        torch.set_rng_state(dense["torch_rng"].cpu())  # map_location moved it to the device
        self.emb.restore(read_rows(path))

    # ------------------------------------------------------------ results
    def _evaluate_and_log(self, i: int) -> dict:
        result = self.evaluate()
        if result:
            self.eval_history.append(dict(result, iteration=i))
            if self.sinks is not None:
                self.sinks.log({f"eval/{k[5:]}": v for k, v in result.items()}, i)
        return result

    @torch.no_grad()
    def evaluate(self) -> dict:
        """AUC, logloss and NE on the eval split, after every cache has been flushed."""
        cfg = self.cfg
        if self.dataset.num_rows("eval") < self.local_b:
            return {}
        reader = self.dataset.batches(self.local_b, seed=cfg.seed, shuffle=False, split="eval")
        scores, labels = [], []
        for j in range(min(len(reader), cfg.eval_batches)):
            batch = reader[j]
            keys = batch_keys(batch.sparse, self.dataset.column_tables)
            present = keys >= 0  # pads: skipped by the lookup, their slot is any
            uniq, inv = np.unique(keys[present], return_inverse=True)
            tmp = SlotCache(len(uniq), cfg.embedding_dim, cfg.state_width, self.device, cfg.optimizer, cfg.lr, cfg.eps)
            tmp.rows[:] = torch.from_numpy(self.emb.rows_for(uniq)).to(self.device)
            slot_of = np.zeros(keys.shape, np.int64)
            slot_of[present] = inv
            kt, _, _ = self.layout.lookup(tmp, torch.from_numpy(slot_of).to(self.device), batch.sparse)
            logits = self.model(torch.from_numpy(batch.dense).to(self.device), kt)
            scores.append(torch.sigmoid(logits).cpu().numpy())
            labels.append(batch.labels)
        return evaluation(np.concatenate(labels), np.concatenate(scores))

    def export_rows(self) -> dict:
        """Per table: ids of every row touched and their final values (embedding and state)."""
        chunks = list(self.emb.touched_rows())
        width = self.emb.cache.width
        keys = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.int64)
        values = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros((0, width), np.float32)
        out = {}
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], values[order]
        tables = key_table(keys)
        dim = self.cfg.embedding_dim
        for t, name in enumerate(self.table_names):
            sel = tables == t
            out[name] = {"ids": torch.from_numpy(key_row(keys[sel]).copy()),
                         "weights": torch.from_numpy(values[sel, :dim].copy()),
                         "state": torch.from_numpy(values[sel, dim:].copy())}
        return out

    def result(self) -> dict:
        """This rank's figures for metrics.json (the runner merges the ranks')."""
        m = self.meters
        ran = max(1, self.iterations - self.start)
        return {"rank": self.rank, "wall_s": self.wall_s, "iterations": self.iterations, "start": self.start,
                "stall_s": m.stall_s, "compute_s": m.compute_s, "comm_s": m.comm_s,
                "rows_fetched": m.rows_fetched, "rows_written_back": m.rows_written_back,
                "train_logloss": m.loss_sum / m.loss_n if m.loss_n else None,  # None: a resume that only finished
                "phase_s_per_iteration": {p: s / ran for p, s in m.phase_s.items()},
                "phase_s_each_iteration": m.phase_per_iteration,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "stall_per_iteration": m.stall_per_iteration, "ended_at": m.ended_at,
                "loss_per_iteration": m.loss_per_iteration, "threads": torch.get_num_threads()}

    def finish(self) -> dict:
        """After training: rank 0 saves the model (before the final evaluation, so a damaged eval
        split cannot lose the run) and evaluates; returns this rank's results."""
        self.comm.barrier()  # every rank's write-backs have landed before anyone reads the store
        result = self.result()
        if self.rank == 0:
            self.run.write_model({"dense": self.model.state_dict(), "tables": self.export_rows(),
                                  "config": self.cfg.to_dict()})
            final = self._evaluate_and_log(self.iterations - 1)
            result.update(final)
            result["eval_history"] = self.eval_history + ([dict(final, iteration=self.iterations - 1)] if final else [])
        return result

    def close(self) -> None:
        self.batches.close()
        self.emb.close()
        if self.sinks is not None:
            self.sinks.close()


def build(cfg: RunConfig, run: RunDir, comm: Communicator, start: int = 0, environ=os.environ,
          placement: Placement | None = None) -> Trainer:
    """A trainer for this rank: its embeddings by the policy table, its step and store I/O by
    ``trainers.mutants`` (planted bugs and faults are chosen here, once)."""
    from trainers import mutants

    step_cls = mutants.select_step(environ)
    io_cls, io_kwargs = mutants.select_store_io(environ)
    device = pick_device(cfg.device)
    dataset = Dataset(cfg.data)
    reader = dataset.batches(cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle, world_size=comm.world,
                             rank=comm.rank, epochs=cfg.epochs)
    iterations = cfg.iterations or len(reader)
    if iterations > len(reader):
        raise TrainerError(f"config key 'iterations': {iterations} > {len(reader)} full batches "
                           f"in {cfg.epochs} epoch(s) of {cfg.data}")
    torch.manual_seed(cfg.seed)  # identical dense initial weights on every rank
    model = build_dense_model(cfg.model_config(), dataset.num_dense, len(dataset.tables)).to(device)
    table_sizes = np.array([n for _, n in dataset.tables], dtype=np.int64)
    if not cfg.rules.planned:
        sparse = dataset.sparse_batches(cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle, epochs=cfg.epochs)
        emb: Embeddings = LocalEmbeddings(table_sizes, cfg.cache_config(), cfg.embedding_dim, cfg.seed, device,
                                          sparse, comm.rank, comm.world, dataset.column_tables)
    else:
        from bagpipe.store import EmbeddingStore
        from trainers.planclient import PlanClient

        endpoints = run.endpoints()
        store = EmbeddingStore(cfg.store_config(endpoints.get("redis_cluster_url")), endpoints["redis"],
                               cfg.embedding_dim, cfg.state_width, table_sizes.tolist())
        tc = cfg.trainer_config()
        if tc.store_io == "agent":
            from trainers.storeagent import StoreAgent

            io = StoreAgent(str(run.path), comm.rank, store.width, cfg.plan_timeout_s, tc.staging_mib << 20,
                            cpus=(placement or Placement()).service_cpus())
            run.write_agent_pid(comm.rank, io.pid)
        else:
            io = io_cls(store, wait_timeout_s=cfg.plan_timeout_s, **io_kwargs)
        from bagpipe.auth import hello_token, read_secret

        job = run.job_id()
        client = PlanClient(endpoints["oracle"], job, comm.rank, cfg.plan_timeout_s, cfg.zmq_curve_dir,
                            reader.epoch_of, hello_token(read_secret(run.secret_path), job, comm.rank))
        emb = CachedEmbeddings(cfg.cache_config(), cfg.rules.bounded, cfg.embedding_dim, device, store, io, client,
                               bypass=cfg.oracle_config().bypasses)
    return Trainer(cfg, run, dataset, comm, start, device, model, emb, step_cls, reader, iterations)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagpipe trainer", description="one trainer rank (under torchrun)")
    parser.add_argument("--run-dir", required=True, type=RunDir)
    parser.add_argument("--first-iteration", type=int, default=0, help="first iteration (a resumed run)")
    args = parser.parse_args(argv)
    run: RunDir = args.run_dir
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    init_logger(f"trainer {rank}")
    die_with_parent()  # torchrun killed outright must not leave ranks waiting for plans
    run.write_rank_pid(rank, os.getpid())
    cfg = RunConfig.from_dict(run.read_config())
    torch.use_deterministic_algorithms(True, warn_only=True)
    # cuBLAS's reproducible mode (read when its first handle is made): on CUDA, every policy's run must do
    # the same arithmetic as every other's.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    placement = Placement.from_dict(run.placement()) if run.placement() else Placement()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cores = placement.trainer_cpus(local_rank)
    if cores:
        os.sched_setaffinity(0, cores)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(cfg.trainer_threads or (len(cores) if cores else max(1, (os.cpu_count() or 2) // local_world)))
    try:
        device = pick_device(cfg.device)  # build() picks the same one
    except TrainerError as exc:
        log.error("rank %d failed: %s", rank, exc)
        return 1
    if device.type == "cpu" and cfg.device == "auto" and torch.cuda.is_available() and rank == 0:
        log.warning("%s trainers on this node and %d GPU(s): training on the CPU (each trainer needs a GPU "
                    "of its own)", os.environ.get("LOCAL_WORLD_SIZE", "1"), torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl's communicators and barriers use the current device
    if world > 1:
        from datetime import timedelta

        # A peer across a cut link fails the collective within the plan timeout, not gloo's 30 minutes.
        backend, timeout = "nccl" if device.type == "cuda" else "gloo", timedelta(seconds=cfg.plan_timeout_s)
        session = os.environ.get(SESSION_ENV)
        if session:  # started by the job runner: what the ranks exchange on torchrun's store is sealed
            try:
                store = trainers_store(read_secret(run.secret_path), session, cfg.plan_timeout_s)
            except (AuthError, RendezvousError) as exc:
                log.error("rank %d failed: %s", rank, exc)
                return 1
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:  # torchrun by hand: its store as it is
            dist.init_process_group(backend=backend, timeout=timeout)
    comm = DistCommunicator() if world > 1 else SoloCommunicator()
    trainer = None
    try:
        trainer = build(cfg, run, comm, start=args.first_iteration, placement=placement)
        trainer.train()
        run.write_rank_result(rank, trainer.finish())
        return 0
    except Exception as exc:
        log.error("rank %d failed: %s", rank, exc)
        if trainer is not None:
            trainer.emb.error(f"rank {rank}: {exc}")
        raise
    finally:
        if trainer is not None:
            trainer.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
