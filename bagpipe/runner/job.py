"""``bagpipe run``: one job on this node: redis-server shards, the oracle, torchrun trainers.

Every process started here is stopped here, by its own pid: at the end, on
Ctrl-C, and as soon as any of them dies (the message names which).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bagpipe.auth import AuthError, new_secret, read_secret, redis_password, split_url_password, write_secret
from bagpipe.checkpoint import CheckpointError
from bagpipe.config import (ConfigError, RunConfig, add_set_argument, capacity_message, partition_capacity_message,
                            partition_shares, smallest_partitioned_cache)
from bagpipe.dataset import Dataset, DatasetError
from bagpipe.keys import distinct_rows_per_partition, distinct_rows_per_trainer
from bagpipe.log import init_logger
from bagpipe.placement import plan_placement
from bagpipe.procs import child_setup, free_port
from bagpipe.rendezvous import SESSION_ENV, Rendezvous, RendezvousError
from bagpipe.rundir import RunDir, RunDirError
from bagpipe.runner.curves import write_curves
from bagpipe.servers import ServersError
from bagpipe.store import StoreError
from bagpipe.tls import TlsError

log = logging.getLogger("bagpipe")


class JobError(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    proc: subprocess.Popen


def _stop(children: list[Child], timeout_s: float = 10.0) -> None:
    """Stop every child by pid (its whole process group: torchrun's workers too)."""
    for c in children:
        if c.proc.poll() is None:
            try:
                os.killpg(c.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout_s
    for c in children:
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(c.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            c.proc.wait()


def _spawn(name: str, cmd: list[str], log_path: Path, cpus: set[int] | None = None,
           env: dict[str, str] | None = None) -> Child:
    out = open(log_path, "ab")
    # A new session per child, so stopping it reaches its own children (torchrun's ranks).
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=child_setup(cpus=cpus), env=env)
    out.close()
    return Child(name, proc)


def _prepare_run_dir(cfg: RunConfig, run: RunDir, resume: bool, iterations: int) -> int:
    """Write the run's config and a new job id; returns the first iteration to run (of ``iterations``)."""
    from bagpipe.checkpoint import Checkpoints, fingerprint, load_manifest

    if not cfg.data or not (Path(cfg.data) / "meta.json").exists():
        raise ConfigError(f"config key 'data': {cfg.data!r} is not a prepared dataset (no meta.json); "
                          "run `bagpipe data prepare` first")
    start = 0
    if resume:
        latest = Checkpoints(run.path).latest()
        if latest is None:
            raise JobError(f"--resume: no checkpoint in {run.checkpoints} (config key 'checkpoint_every' "
                           f"is {cfg.checkpoint_every})")
        data_hash = json.loads((Path(cfg.data) / "meta.json").read_text()).get("content_hash", "")
        manifest = load_manifest(latest, fingerprint(cfg.to_dict(), data_hash))
        start = manifest["iteration"] + 1
        # Killed after its last checkpoint but before its results: the resume trains nothing and finishes
        # (final evaluation, model.pt, metrics.json). A finished run has nothing left and is refused.
        finishing = start == iterations and not run.metrics_path.exists()
        if start >= iterations and not finishing:
            raise JobError(f"--resume: the checkpoint {latest.name} is after iteration {start - 1} and this run has "
                           f"{iterations} iterations (config key 'iterations' is {cfg.iterations}): nothing is left "
                           f"to run; set iterations > {start} to train further")
        log.info("resuming from the checkpoint after iteration %d (%s)", manifest["iteration"], latest.name)
    run.create()
    _write_run_files(run, cfg, uuid.uuid4().hex)
    if not resume:
        shutil.rmtree(run.checkpoints, ignore_errors=True)
        run.clear_history()
    return start


def resume_hint(run_dir: Path) -> str:
    """The line a failed job ends with: the last checkpoint to resume from (rows lost with a shard
    without persistence come back from there), or that there is none."""
    from bagpipe.checkpoint import Checkpoints

    try:
        latest = Checkpoints(run_dir).latest()
    except Exception:  # a damaged pointer: the resume itself will say so
        latest = None
    if latest is None:
        return "\nno checkpoint to resume from (config key 'checkpoint_every'): the run must start again"
    return (f"\nthe last checkpoint is {latest}: resume from it with "
            f"`bagpipe run --run-dir {run_dir} --resume`")


PREFLIGHT_BATCHES = 64


def _preflight(cfg: RunConfig) -> int:
    """Check at start what would otherwise fail late; returns the run's iteration count.

    The data: a dataset without page checksums (prepared by an earlier
    version) against its content hash; the eval split's batches that
    evaluations read, so a damaged eval file cannot stop the run after its
    training; and the first ``PREFLIGHT_BATCHES`` batches, for a cache too
    small for one iteration (the oracle checks every batch as it plans; this
    names the common mistake before any process starts, with the smallest
    workable size). Every read verifies page checksums and row ids.
    """
    try:
        return _check_data(cfg)
    except DatasetError as exc:
        raise ConfigError(f"config key 'data': {exc}") from None


def _check_data(cfg: RunConfig) -> int:
    rules = cfg.rules
    dataset = Dataset(cfg.data)
    if not dataset.page_checksums:
        log.info("%s was prepared without page checksums: checking its content hash (prepare it again to "
                 "skip this)", cfg.data)
        dataset.verify_content_hash()
    sparse = dataset.sparse_batches(cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle, epochs=cfg.epochs)
    iterations = min(cfg.iterations or len(sparse), len(sparse))
    if cfg.iterations > len(sparse):
        raise ConfigError(f"config key 'iterations': {cfg.iterations} > {len(sparse)} full batches of "
                          f"{cfg.batch_size} in {cfg.epochs} epoch(s) of {cfg.data} (raise 'epochs')")
    # The rows every evaluation reads (trainers.trainer.Trainer.evaluate: rank 0, local batches, file order).
    if dataset.num_rows("eval") >= cfg.local_batch:
        evals = dataset.batches(cfg.local_batch, seed=cfg.seed, shuffle=False, split="eval")
        for j in range(min(len(evals), cfg.eval_batches)):
            evals[j]
    # Bounded policies: a trainer's whole batch may not fit, so count what the first batches need.
    cfg.model_config().pooling_per_table(len(dataset.tables))  # one pooling, or one per table
    k = cfg.oracle_partitions
    # With partitions, one partition's rows may overflow its share while the batch fits the whole cache.
    bounded = rules.planned and rules.bounded and (k > 1 or
                                                  cfg.cache_rows < cfg.local_batch * len(dataset.column_tables))
    worst = (0, 0, 0)  # (distinct rows, trainer, iteration)
    shares = partition_shares(cfg.cache_rows, k)
    most = np.zeros(k, np.int64)  # per partition, the most one trainer reads in one iteration
    over = None  # (partition, trainer, rows, iteration): the first share found too small
    for i in range(min(iterations, PREFLIGHT_BATCHES)):
        batch = sparse[i]  # read, and so checked, whatever the policy
        if bounded and k == 1:
            counts = distinct_rows_per_trainer(batch, cfg.trainers, dataset.column_tables)
            t = int(np.argmax(counts))
            worst = max(worst, (int(counts[t]), -t, -i))
        elif bounded:
            counts = distinct_rows_per_partition(batch, cfg.trainers, k, dataset.column_tables)  # [trainers, k]
            most = np.maximum(most, counts.max(axis=0))
            if over is None and (counts > np.array(shares)).any():
                t, p = (int(x[0]) for x in np.nonzero(counts > np.array(shares)))
                over = (p, t, int(counts[t, p]), i)
    if over is not None:
        p, t, need, i = over
        raise ConfigError(partition_capacity_message(cfg.cache_rows, k, p, shares[p], t, need, i,
                                                     smallest_partitioned_cache(most.tolist()), at_least=True))
    need, t, i = worst[0], -worst[1], -worst[2]
    if bounded and cfg.cache_rows < need:
        raise ConfigError(capacity_message(cfg.cache_rows, t, need, i, need, at_least=True))
    return iterations


def _fill_store(cfg: RunConfig, urls: list[str], run: RunDir, start: int, cluster_url: str | None,
                password: str) -> None:
    """A fresh job starts from an empty store; a resumed one from its checkpoint's rows."""
    from bagpipe.checkpoint import Checkpoints, read_rows
    from bagpipe.store import EmbeddingStore

    store_cfg = dataclasses.replace(cfg.store_config(cluster_url), job_password=password)
    store = EmbeddingStore(store_cfg, urls, cfg.embedding_dim, cfg.state_width, [1])
    try:
        store.flush_all()
        if start > 0:
            rows = 0
            for keys, values in read_rows(Checkpoints(run.path).latest()):
                if values.shape[1] != store.width:
                    raise JobError(f"the checkpoint holds rows of {values.shape[1]} floats; this job expects "
                                   f"{store.width} (config keys 'embedding_dim' and 'optimizer')")
                store.put(keys, values, -1)
                rows += len(keys)
            log.info("loaded %d rows from the checkpoint into the store", rows)
            store.validate()
    finally:
        store.close()


@dataclass(frozen=True)
class LaunchConfig:
    """Where this node's part of a job runs, in torchrun's vocabulary (see docs/multinode.md).

    One node (the default) starts everything on loopback. With several, node
    0 hosts the rendezvous store at ``master_addr:rendezvous_port`` and the
    oracle; nodes with ``shards_per_node`` start redis-server shards on
    ``host``; every node starts torchrun for its ``nproc_per_node`` trainers.
    """

    nnodes: int = 1
    node_rank: int = 0
    nproc_per_node: int = 0  # 0: the config's 'trainers' (one node)
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # torchrun's; 0: a free port (one node only)
    rendezvous_port: int = 0  # ours; 0: master_port + 1 (several nodes) or a free port (one node)
    host: str = "127.0.0.1"  # the address this node's oracle and shards bind
    shards_per_node: int = -1  # -1: the config's 'shards' on node 0 unless redis_urls are given
    redis_urls: tuple[str, ...] = ()
    join_timeout_s: float = 120.0
    secret_file: str = ""  # the secret every node of a job shares (`bagpipe keys`); one node: a fresh one

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} is not in [0, {self.nnodes})")
        if self.nnodes > 1 and not self.master_port:
            raise ConfigError("--master-port (MASTER_PORT) is required with several nodes")
        if self.nnodes > 1 and self.nproc_per_node < 1:
            raise ConfigError("--nproc-per-node (NPROC_PER_NODE) is required with several nodes")
        for name in ("master_port", "rendezvous_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ConfigError(f"--{name.replace('_', '-')}: not a port: {getattr(self, name)}")
        if self.join_timeout_s <= 0:
            raise ConfigError("--join-timeout must be > 0")
        if self.nnodes > 1 and not self.secret_file:
            raise ConfigError("--secret-file (BAGPIPE_SECRET_FILE) is required with several nodes: write one with "
                              "`bagpipe keys --out DIR` and copy DIR/job.secret to every node (docs/security.md)")

    def shards_here(self, cfg: RunConfig) -> int:
        if not cfg.rules.planned:
            return 0  # every row lives in the trainers
        if self.shards_per_node >= 0:
            return self.shards_per_node
        external = self.redis_urls or cfg.redis_urls or cfg.redis_cluster_url
        return cfg.shards if self.node_rank == 0 and not external else 0


def run_job(cfg: RunConfig, run_dir: Path, quiet: bool = False, resume: bool = False,
            launch: LaunchConfig | None = None) -> dict:
    """Run this node's part of a job to completion (or the rest of it, from its last checkpoint).

    Returns the merged metrics on node 0 and this node's own elsewhere.
    """
    launch = launch or LaunchConfig()
    master = launch.node_rank == 0
    single = launch.nnodes == 1
    run = RunDir(run_dir)
    lock = run.lock()  # held until every process of this job is stopped (finally, below)
    started = time.perf_counter()
    # Passwords never reach a file: URLs are kept without theirs, the store clients get it from
    # the environment (bagpipe.auth, docs/security.md).
    cfg, launch, url_password = _strip_passwords(cfg, launch)
    secret = read_secret(Path(launch.secret_file), "--secret-file") if launch.secret_file else new_secret()
    store_cfg = cfg.store_config()
    password = store_cfg.password or url_password or redis_password(secret)
    child_env = dict(os.environ, **{store_cfg.password_env: password})
    rdzv_port = launch.rendezvous_port or (free_port(launch.master_addr) if single else launch.master_port + 1)
    rdzv = Rendezvous(launch.master_addr, rdzv_port, master, launch.join_timeout_s, secret, launch.node_rank)
    node = f"node {launch.node_rank}"
    servers = None
    children: list[Child] = []
    try:
        # 1. Node 0 decides the job: config, id, first iteration.
        if master:
            if launch.nproc_per_node:
                cfg = cfg.replace(trainers=launch.nnodes * launch.nproc_per_node)
            start = _prepare_run_dir(cfg, run, resume, _preflight(cfg))
            # Written once the run directory is known to be this job's: a refused resume touches nothing.
            write_secret(run.secret_path, secret)  # owner-only, this launch's
            job = {"config": cfg.to_dict(), "job_id": run.job_id(), "start": start}
            rdzv.open(job, launch.nnodes)  # this launch's session; every node gets the job sealed for it
        else:
            job = rdzv.join(who=f"the job description from node 0 ({launch.master_addr})")
            cfg = RunConfig.from_dict(job["config"])
            start = job["start"]
            _write_run_files(run, cfg, job["job_id"])
            write_secret(run.secret_path, secret)
        # The trainers seal what they exchange on torchrun's store with the secret, for this launch.
        child_env[SESSION_ENV] = rdzv.session
        # Which cores this node's trainers and its other processes run on (bagpipe.placement).
        nproc = launch.nproc_per_node or cfg.trainers
        placement = plan_placement(cfg.cpu_placement, nproc)
        run.write_placement(placement.to_dict())
        if placement.reason:
            log.info("cpu_placement %s: nothing pinned (%s)", cfg.cpu_placement, placement.reason)
        run.rotate_logs()  # this launch's logs start empty; the earlier launches' are kept
        # 2. Every node starts the shards it was asked for and says where they are.
        shards = launch.shards_here(cfg)
        urls: list[str] = []
        cluster_url = ""
        if shards:
            from bagpipe.servers import RedisClusterServers, RedisServers

            store_cfg = dataclasses.replace(cfg.store_config(), shards=shards, host=launch.host, job_password=password)
            servers = (RedisClusterServers if cfg.redis_cluster else RedisServers)(store_cfg, run.redis)
            servers.start()
            for pid in servers.pids:
                if placement.pinned:
                    os.sched_setaffinity(pid, placement.service_cpus())
            urls = list(servers.urls)
            if cfg.redis_cluster:
                cluster_url = servers.cluster_url
                urls = [cluster_url]
        # The oracle's worker processes this node runs (worker w on node w % nnodes; oracle.workers).
        workers: dict[int, str] = {}
        if cfg.rules.planned:
            for w in range(1, cfg.oracle_workers + 1):
                if w % launch.nnodes != launch.node_rank:
                    continue
                host = launch.host if not single else cfg.oracle_bind.split("//", 1)[-1].rsplit(":", 1)[0]
                workers[w] = f"tcp://{host}:{free_port(host)}"
                children.append(_spawn(f"oracle-worker{w}", [sys.executable, "-m", "bagpipe", "oracle-worker",
                                                             "--run-dir", str(run_dir), "--endpoint", workers[w],
                                                             "--worker", str(w), "--first-iteration", str(start)],
                                       run.log(f"oracle-worker{w}"), placement.service_cpus(), child_env))
        rdzv.publish(f"shards/{launch.node_rank}", {"urls": urls, "cluster_url": cluster_url, "workers": workers})
        # 3. Node 0 gathers the shards, fills the store, starts the oracle and publishes the endpoints.
        if master:
            endpoints = {"redis": [], "redis_cluster_url": cfg.redis_cluster_url, "oracle": ""}
            if cfg.rules.planned:
                endpoints["redis"] = list(launch.redis_urls or cfg.redis_urls) or (
                    [cfg.redis_cluster_url] if cfg.redis_cluster_url else [])
                worker_endpoints: dict[int, str] = {}
                for r in range(launch.nnodes):
                    node_shards = rdzv.get(f"shards/{r}", who=f"node {r} (it never joined)")
                    endpoints["redis"] += node_shards["urls"]
                    endpoints["redis_cluster_url"] = endpoints["redis_cluster_url"] or node_shards["cluster_url"]
                    worker_endpoints.update({int(w): e for w, e in node_shards.get("workers", {}).items()})
                if not endpoints["redis"]:
                    raise JobError("no embedding servers: give --redis URL or --shards-per-node S")
                _fill_store(cfg, endpoints["redis"], run, start, endpoints["redis_cluster_url"], password)
                host = launch.host if not single else cfg.oracle_bind.split("//", 1)[-1].rsplit(":", 1)[0]
                port = int(cfg.oracle_bind.rsplit(":", 1)[-1]) or free_port(host)
                endpoints["oracle"] = f"tcp://{host}:{port}"
                endpoints["oracle_workers"] = [worker_endpoints[w] for w in sorted(worker_endpoints)]
                children.append(_spawn("oracle", [sys.executable, "-m", "bagpipe", "oracle", "--run-dir",
                                                  str(run_dir), "--endpoint", endpoints["oracle"],
                                                  "--first-iteration", str(start),
                                                  "--workers", ",".join(endpoints["oracle_workers"])],
                                       run.log("oracle"), placement.service_cpus(), child_env))
            rdzv.publish("endpoints", endpoints)
        else:
            endpoints = rdzv.get("endpoints", who="the endpoints from node 0")
        run.write_endpoints(endpoints)
        # 4. torchrun for this node's trainers.
        master_port = launch.master_port or free_port(launch.master_addr)
        trainer_cmd = [sys.executable, "-m", "bagpipe.runner.torchrun", "--nnodes", str(launch.nnodes),
                       "--node-rank", str(launch.node_rank), "--nproc-per-node", str(nproc),
                       "--master-addr", launch.master_addr, "--master-port", str(master_port),
                       "--module", "trainers.trainer", "--run-dir", str(run_dir), "--first-iteration", str(start)]
        children.append(_spawn("trainers", trainer_cmd, run.log("trainers"), placement.all_trainer_cpus(), child_env))
        # Every pid this node started, for operators and for tests that check nothing is left behind.
        pids = {c.name: c.proc.pid for c in children}
        if servers is not None:
            pids.update({f"redis{i}": pid for i, pid in enumerate(servers.pids)})
        run.write_pids(pids)
        try:
            _watch(children, run, quiet, lambda: _other_node_failed(rdzv, launch), wait_elsewhere_s=0.0 if single
                   else ELSEWHERE_WAIT_S)
        except JobError as exc:
            try:
                rdzv.publish(f"failed/{launch.node_rank}", str(exc))  # whole: the other nodes quote it
            except RendezvousError:
                pass  # node 0 is out of reach: this node's own reason is the one to give
            raise
        # 5. Results: every node hands its ranks' figures to node 0; shards stay up until node 0 is done.
        mine = run.rank_results()
        rdzv.publish(f"ranks/{launch.node_rank}", mine)
        if master:
            ranks = []
            for r in range(launch.nnodes):
                ranks += rdzv.get(f"ranks/{r}", who=f"the results of node {r}")
            metrics = _merge_metrics(cfg, ranks, run, time.perf_counter() - started)
            metrics["placement"] = placement.to_dict()
            metrics["loss_per_iteration"] = sorted(ranks, key=lambda r: r["rank"])[0].get("loss_per_iteration", [])
            run.write_metrics(metrics)
            try:
                write_curves(metrics, run.curves_path)
            except Exception as exc:  # a plot is a convenience; the run's results stand without it
                log.warning("curves.png not written: %s", exc)
            rdzv.publish("finished", True)
            # The rendezvous store lives in this process: keep it until every node has seen the end.
            for r in range(1, launch.nnodes):
                try:
                    rdzv.get(f"left/{r}", timeout_s=30.0, who=f"node {r}'s goodbye")
                except RendezvousError as exc:
                    log.warning("%s", exc)
            return metrics
        _wait_finished(rdzv, launch)
        rdzv.publish(f"left/{launch.node_rank}", True)
        return {"node": launch.node_rank, "ranks": mine}
    finally:
        _stop(children)
        if servers is not None:
            servers.stop()
        lock.release()
        log.debug("%s stopped everything it started", node)


def _strip_passwords(cfg: RunConfig, launch: LaunchConfig) -> tuple[RunConfig, LaunchConfig, str | None]:
    """The config and launch with every Redis URL's password removed, and that password (one for all)."""
    found: set[str] = set()

    def strip(url: str) -> str:
        bare, pw = split_url_password(url)
        if pw is not None:
            found.add(pw)
        return bare

    cfg = cfg.replace(redis_urls=tuple(strip(u) for u in cfg.redis_urls),
                      redis_cluster_url=strip(cfg.redis_cluster_url) if cfg.redis_cluster_url else "")
    launch = dataclasses.replace(launch, redis_urls=tuple(strip(u) for u in launch.redis_urls))
    if len(found) > 1:
        raise ConfigError("the Redis URLs carry different passwords; a job uses one password for every shard "
                          "(give it once, in $BAGPIPE_REDIS_PASSWORD)")
    return cfg, launch, next(iter(found), None)


def _write_run_files(run: RunDir, cfg: RunConfig, job_id: str) -> None:
    run.write_config(cfg.to_dict())
    run.write_job_id(job_id)
    run.clear_results()


def _other_node_failed(rdzv: Rendezvous, launch: LaunchConfig) -> str | None:
    for r in range(launch.nnodes):
        if r != launch.node_rank:
            msg = rdzv.poll(f"failed/{r}")
            if msg is not None:
                return f"node {r} failed: {msg}"
    return None


def _wait_finished(rdzv: Rendezvous, launch: LaunchConfig) -> None:
    """Keep this node's shards up until node 0 has read every row (or failed)."""
    deadline = time.monotonic() + max(launch.join_timeout_s, 600.0)
    while time.monotonic() < deadline:
        if rdzv.poll("finished") is not None:
            return
        failed = _other_node_failed(rdzv, launch)
        if failed:
            raise JobError(failed)
        time.sleep(0.2)
    raise JobError(f"node 0 did not finish within {max(launch.join_timeout_s, 600.0):g}s after this node's trainers")


# Error lines that only report that another process failed first (a peer gone from the collective,
# the plan stream cut, a node that stopped): a failure summary quotes them after the causes.
_CONSEQUENCE = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|DistBackendError|"
                          r"DistNetworkError|the oracle stopped|the oracle ended the plan stream|"
                          r"trainer \d+ stopped: |trainer \d+ is gone|node \d+ failed: |lost rank\(s\) |"
                          r"no credit from trainer \d+ within")
# A Python exception's last traceback line ("module.SomeError: message"): a child's reason when it
# logged no ERROR line of its own.
_RANK = r"^(?:\[(?:default)?rank\d+\]:\s*)?"  # torchrun's prefix on a worker's lines, when it adds one
_EXCEPTION_LINE = re.compile(_RANK + r"[A-Za-z_][\w.]*(Error|Exception|Interrupt): \S")
_LOG_PREFIX = re.compile(_RANK + r"\d\d:\d\d:\d\d ERROR ")
ELSEWHERE_WAIT_S = 5.0  # how long a node whose trainers lost a peer waits for another node's cause


def _reasons(lines: list[str]) -> list[str]:
    """A failed child's own reasons, whole, in the order they were logged: its ERROR lines, or
    failing those the exception lines of its tracebacks."""
    reasons = [_LOG_PREFIX.sub("", ln) for ln in lines if " ERROR " in ln]
    return reasons or [ln for ln in lines if _EXCEPTION_LINE.match(ln)]


def failure_summary(failed: list[tuple[str, int, int | None, list[str]]], elsewhere: str | None = None) -> str:
    """What a job's failure says: its first line the first cause, quoted whole.

    ``failed`` holds (name, pid, exit code or None if still running, log
    lines) per child that failed or logged an error, the trainers first.
    Reasons that only report another process's failure (``_CONSEQUENCE``)
    come after the others; ``elsewhere`` (another node's report) leads when
    every reason here is such a consequence.
    """
    quoted = []
    for k, (name, pid, rc, lines) in enumerate(failed):
        head = f"{name} (pid {pid}) " + (f"exited with code {rc}" if rc is not None else "is stopping")
        for j, reason in enumerate(_reasons(lines)):
            quoted.append(((bool(_CONSEQUENCE.search(reason)), k, j), f"{head}: {reason}"))
    quoted.sort(key=lambda q: q[0])
    own_cause = bool(quoted) and not quoted[0][0][0]
    lines = [q[1] for q in quoted[:6]]
    if elsewhere and not own_cause:
        lines.insert(0, elsewhere)
    if not lines:
        lines = [f"{name} (pid {pid}) exited with code {rc} (no error in its log)" for name, pid, rc, _ in failed
                 if rc is not None]
    for name, pid, rc, log_lines in failed:  # then the end of each log, for context
        lines.append(f"the end of the {name} log:")
        lines += [f"  {ln}" for ln in log_lines[-8:]]
    return "\n".join(lines)


def _watch(children: list[Child], run: RunDir, quiet: bool, elsewhere=lambda: None,
           wait_elsewhere_s: float = 0.0) -> None:
    """Wait for the trainers; stop at the first child that fails (or other node), naming it."""
    trainers = children[-1]
    log_path = run.log("trainers")
    shown = 0
    # A terminal gets a progress bar (from rank 0's progress.json); files and CI get log lines.
    bar = ProgressBar(run) if not quiet and sys.stderr.isatty() else None
    while True:
        if not quiet and log_path.exists():
            text = log_path.read_text(errors="replace")
            for line in text[shown:].splitlines():
                if ("[trainer 0]" in line and (bar is None or " iteration " not in line)) or "Error" in line:
                    (bar.write if bar else lambda s: print(s, file=sys.stderr))(line)
            shown = len(text)
        if bar is not None:
            bar.update()
        if any(_failed(c, trainers) for c in children):
            # One death usually brings down the others within moments (the oracle loses a
            # trainer, torchrun stops the other ranks): wait briefly and name every one,
            # the trainers first, since the oracle only reports what it lost.
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and not all(c.proc.poll() is not None for c in children):
                time.sleep(0.1)
            # Children still running count when they logged an error: torchrun outlives its
            # failed rank by seconds, and that rank's error is often the cause.
            logs = []
            for c in sorted(children, key=lambda c: c is not trainers):
                lines = run.log(c.name).read_text(errors="replace").strip().splitlines()
                if _failed(c, trainers) or (c.proc.poll() is None and _reasons(lines)):
                    logs.append((c.name, c.proc.pid, c.proc.poll(), lines))
            other = _quietly(elsewhere)
            wait_until = time.monotonic() + wait_elsewhere_s
            while other is None and time.monotonic() < wait_until and not _has_own_cause(logs):
                time.sleep(0.2)  # our trainers lost a peer: the node where it failed says why
                other = _quietly(elsewhere)
            raise JobError(failure_summary(logs, other) + resume_hint(run.path))
        if trainers.proc.poll() == 0:
            if bar is not None:
                bar.close()
            return
        failed = elsewhere()
        if failed:
            raise JobError(failed)
        time.sleep(0.2)


def _quietly(elsewhere) -> str | None:
    """Another node's failure report, if it can be had (not if node 0 is gone too)."""
    try:
        return elsewhere()
    except RendezvousError:
        return None


def _has_own_cause(logs: list[tuple[str, int, int | None, list[str]]]) -> bool:
    return any(not _CONSEQUENCE.search(r) for _, _, _, lines in logs for r in _reasons(lines))


def _failed(c: Child, trainers: Child) -> bool:
    rc = c.proc.poll()
    # The oracle and its workers end (code 0) before the trainers finish; any other exit is a failure.
    return rc is not None and (rc != 0 or (c is not trainers and not c.name.startswith("oracle")))


def steady_phase_means(ranks: list[dict], warm: int) -> dict[str, float]:
    """Seconds per iteration in each phase of a step (trainers.step.PHASES), the slowest rank's,
    over the iterations after the first ``warm``: the same span as ``samples_per_s_steady``."""
    means = {}
    for phase in ranks[0]["phase_s_each_iteration"]:
        per_rank = [r["phase_s_each_iteration"][phase][warm:] for r in ranks]
        means[phase] = max((sum(s) / len(s) if s else 0.0) for s in per_rank)
    return means


def _merge_metrics(cfg: RunConfig, ranks: list[dict], run: RunDir, wall_s: float) -> dict:
    ranks = sorted(ranks, key=lambda r: r["rank"])
    if [r["rank"] for r in ranks] != list(range(cfg.trainers)):
        raise JobError(f"results came from ranks {[r['rank'] for r in ranks]}, expected 0..{cfg.trainers - 1}")
    iterations = ranks[0]["iterations"]
    ran = iterations - ranks[0].get("start", 0)  # a resumed launch runs only the rest
    train_wall = max(r["wall_s"] for r in ranks)
    # Steady state: the rate after the first iterations (start-up, first plans, first window
    # of data), from the slowest rank's iteration end times.
    ends = [max(r["ended_at"][j] for r in ranks) for j in range(len(ranks[0]["ended_at"]))]
    warm = min(10, len(ends) // 5)
    steady = ((len(ends) - warm) * cfg.batch_size / (ends[-1] - ends[warm - 1])
              if warm >= 1 and ends[-1] > ends[warm - 1] else None)
    metrics = {
        "policy": cfg.policy,
        "iterations": iterations,
        "resumed_from": ranks[0].get("start", 0) - 1 if ranks[0].get("start", 0) else None,
        "iterations_run": ran,
        "samples_per_s": ran * cfg.batch_size / max(train_wall, 1e-9),
        "samples_per_s_steady": steady,
        "warmup_iterations": warm,
        "wall_s": wall_s,
        "train_wall_s": train_wall,
        "train_logloss": ranks[0]["train_logloss"],
        "eval_auc": ranks[0].get("eval_auc"),
        "eval_logloss": ranks[0].get("eval_logloss"),
        "eval_ne": ranks[0].get("eval_ne"),
        "eval_history": ranks[0].get("eval_history", []),
        "rows_fetched": sum(r["rows_fetched"] for r in ranks),
        "rows_written_back": sum(r["rows_written_back"] for r in ranks),
        "stall_s": max(r["stall_s"] for r in ranks),
        "peak_rss_bytes": {f"trainer{r['rank']}": r["peak_rss_bytes"] for r in ranks},
        "stall_per_iteration": ranks[0]["stall_per_iteration"],
        # The slowest rank's seconds per iteration in each phase of a step (trainers.step.PHASES).
        "trainer_phase_s": steady_phase_means(ranks, warm),
        # The same over every iteration of this launch, the first plan's wait for the oracle included.
        "trainer_phase_s_all": {p: max(r["phase_s_per_iteration"][p] for r in ranks)
                                for p in ranks[0]["phase_s_per_iteration"]},
    }
    run.write_metrics(metrics)
    if metrics["train_logloss"] is not None and not math.isfinite(metrics["train_logloss"]):
        raise JobError(f"training diverged: train logloss is {metrics['train_logloss']} (config keys 'lr', "
                       f"'dense_lr'; the model in {run.model_path} is not usable)")
    return metrics


class ProgressBar:
    """The job's progress in a terminal: iterations, samples/s (steady), loss, hit rate, stall, ETA."""

    def __init__(self, run: RunDir) -> None:
        from tqdm import tqdm

        self.run = run
        self.bar = tqdm(total=None, unit="it", desc="training", dynamic_ncols=True, leave=True)
        self.at = 0

    def update(self) -> None:
        p = self.run.progress()
        if not p or "train/loss" not in p:
            return
        if self.bar.total is None:
            self.bar.reset(total=p["iterations"])
        self.bar.update(p["iteration"] - self.at)
        self.at = p["iteration"]
        post = {"samples/s": f"{p['train/samples_per_s']:.0f}", "loss": f"{p['train/loss_mean']:.4f}",
                "hit": f"{100 * p['train/hit_rate']:.1f}%", "stall": f"{p['train/stall_s']:.1f}s"}
        if "eval/auc" in p:
            post.update(AUC=f"{p['eval/auc']:.4f}", NE=f"{p['eval/ne']:.4f}")
        self.bar.set_postfix(post, refresh=True)

    def write(self, line: str) -> None:
        self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.update()
        self.bar.close()


def format_report(m: dict) -> str:
    auc = f"{m['eval_auc']:.4f}" if m.get("eval_auc") is not None else "n/a"
    ne = f"{m['eval_ne']:.4f}" if m.get("eval_ne") is not None else "n/a"
    logloss = f"{m['eval_logloss']:.4f}" if m.get("eval_logloss") is not None else "n/a"
    steady = m.get("samples_per_s_steady") or m["samples_per_s"]
    if m.get("iterations_run") == 0:
        return (f"policy {m['policy']}: {m['iterations']} iterations, finished from the checkpoint after iteration "
                f"{m['resumed_from']} (nothing was left to train): eval AUC {auc}, logloss {logloss} nats, NE {ne}")
    return (f"policy {m['policy']}: {m['iterations']} iterations, {steady:.0f} samples/s steady "
            f"({m['samples_per_s']:.0f} over the whole run), train logloss {m['train_logloss']:.4f} nats, "
            f"eval AUC {auc}, logloss {logloss} nats, NE {ne}, stalled {m['stall_s']:.2f}s, "
            f"rows fetched {m['rows_fetched']}, written back {m['rows_written_back']}")


def _launch_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    g = parser.add_argument_group("several nodes (torchrun's vocabulary; defaults from the environment)")
    g.add_argument("--nnodes", type=int, default=int(env("NNODES", 1)))
    g.add_argument("--node-rank", type=int, default=int(env("NODE_RANK", 0)))
    g.add_argument("--nproc-per-node", type=int, default=int(env("NPROC_PER_NODE", 0)),
                   help="trainers on this node (default: the config's 'trainers' on one node)")
    g.add_argument("--master-addr", default=env("MASTER_ADDR", "127.0.0.1"))
    g.add_argument("--master-port", type=int, default=int(env("MASTER_PORT", 0)))
    g.add_argument("--rdzv-port", type=int, default=int(env("BAGPIPE_RDZV_PORT", 0)),
                   help="node 0's endpoint store (default MASTER_PORT + 1)")
    g.add_argument("--host", default=env("BAGPIPE_HOST", "127.0.0.1"),
                   help="the address this node's oracle and redis-server shards bind")
    g.add_argument("--shards-per-node", type=int, default=int(env("SHARDS_PER_NODE", -1)))
    g.add_argument("--redis", nargs="+", default=[], metavar="URL",
                   help="existing embedding servers, redis://host:port/0 each")
    g.add_argument("--redis-cluster", default="", metavar="URL", help="a node of an existing Redis Cluster")
    g.add_argument("--join-timeout", type=float, default=float(env("BAGPIPE_JOIN_TIMEOUT", 120)))
    g.add_argument("--secret-file", default=env("BAGPIPE_SECRET_FILE", ""),
                   help="the job secret every node shares (`bagpipe keys` writes job.secret); one node: fresh")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagpipe run", description="run a training job (this node's part)")
    parser.add_argument("--config", type=Path, help="TOML config file (see configs/); node 0 only")
    add_set_argument(parser)
    parser.add_argument("--run-dir", type=Path, help="where logs, metrics and the model go (default runs/<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the job in --run-dir from its last checkpoint (its config.json, plus --set)")
    _launch_args(parser)
    args = parser.parse_args(argv)
    init_logger("job")
    try:
        launch = LaunchConfig(nnodes=args.nnodes, node_rank=args.node_rank, nproc_per_node=args.nproc_per_node,
                              master_addr=args.master_addr, master_port=args.master_port,
                              rendezvous_port=args.rdzv_port, host=args.host,
                              shards_per_node=args.shards_per_node, join_timeout_s=args.join_timeout,
                              redis_urls=tuple(args.redis), secret_file=args.secret_file)
        if launch.node_rank > 0 and (args.set or args.config):
            # Node 0 decides the job and hands its config to every node: a key given here would be
            # ignored, so it is refused rather than silently dropped.
            given = "--set " + " ".join(args.set) if args.set else "--config"
            raise ConfigError(f"{given} on node {launch.node_rank}: only node 0 takes a config and overrides; "
                              "every other node runs the config node 0 publishes (give them there)")
        if args.resume and launch.node_rank == 0:
            if args.run_dir is None or not RunDir(args.run_dir).has_config():
                raise JobError("--resume needs the --run-dir of an earlier run (with its config.json)")
            saved = RunDir(args.run_dir).read_config()
            cfg = RunConfig.load(args.config, args.set, base=None if args.config else saved)
        else:
            cfg = RunConfig.load(args.config, args.set)
        if args.redis:
            cfg = cfg.replace(redis_urls=tuple(args.redis))
        if args.redis_cluster:
            cfg = cfg.replace(redis_cluster_url=args.redis_cluster)
        run_dir = args.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        metrics = run_job(cfg, run_dir, resume=args.resume, launch=launch)
    except (AuthError, TlsError, ConfigError, JobError, CheckpointError, DatasetError, RendezvousError, RunDirError, ServersError,
            StoreError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; every process of the job was stopped")
        return 130
    if "policy" in metrics:
        print(format_report(metrics))
    print(f"run directory: {run_dir}")
    return 0
