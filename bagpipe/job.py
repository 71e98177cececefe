"""``bagpipe run``: one job on this node: redis-server shards, the oracle, torchrun trainers.

Every process started here is stopped here, by its own pid: at the end, on
Ctrl-C, and as soon as any of them dies (the message names which).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bagpipe.checkpoint import CheckpointError
from bagpipe.config import ConfigError, RunConfig
from bagpipe.log import init_logger
from bagpipe.procs import new_session_dying_with_parent

log = logging.getLogger("bagpipe")


class JobError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def _spawn(name: str, cmd: list[str], log_path: Path) -> Child:
    out = open(log_path, "ab")
    # A new session per child, so stopping it reaches its own children (torchrun's ranks).
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=new_session_dying_with_parent)
    out.close()
    return Child(name, proc)


def _prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> int:
    """Write the run's config and a new job id; returns the first iteration to run."""
    from bagpipe.checkpoint import Checkpoints, fingerprint, load_manifest

    if not cfg.data or not (Path(cfg.data) / "meta.json").exists():
        raise ConfigError(f"config key 'data': {cfg.data!r} is not a prepared dataset (no meta.json); "
                          "run `bagpipe data prepare` first")
    start = 0
    if resume:
        latest = Checkpoints(run_dir).latest()
        if latest is None:
            raise JobError(f"--resume: no checkpoint in {run_dir}/checkpoints (config key 'checkpoint_every' "
                           f"is {cfg.checkpoint_every})")
        data_hash = json.loads((Path(cfg.data) / "meta.json").read_text()).get("content_hash", "")
        manifest = load_manifest(latest, fingerprint(cfg.to_dict(), data_hash))
        start = manifest["iteration"] + 1
        log.info("resuming from the checkpoint after iteration %d (%s)", manifest["iteration"], latest.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    (run_dir / "job_id").write_text(uuid.uuid4().hex)
    for old in (list(run_dir.glob("rank*.json")) + list(run_dir.glob("rank*.pid"))
                + [run_dir / "model.pt", run_dir / "metrics.json"]):
        old.unlink(missing_ok=True)
    if not resume:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return start


def _fill_store(cfg: RunConfig, urls: list[str], run_dir: Path, start: int) -> None:
    """A fresh job starts from an empty store; a resumed one from its checkpoint's rows."""
    from bagpipe.checkpoint import Checkpoints, read_rows
    from bagpipe.store import EmbeddingStore

    store = EmbeddingStore(cfg.store_config(), urls, cfg.embedding_dim, cfg.state_width, [1])
    try:
        store.flush_all()
        if start > 0:
            rows = 0
            for keys, values in read_rows(Checkpoints(run_dir).latest()):
                if values.shape[1] != store.width:
                    raise JobError(f"the checkpoint holds rows of {values.shape[1]} floats; this job expects "
                                   f"{store.width} (config keys 'embedding_dim' and 'optimizer')")
                store.put(keys, values, -1)
                rows += len(keys)
            log.info("loaded %d rows from the checkpoint into the store", rows)
    finally:
        store.close()


def run_job(cfg: RunConfig, run_dir: Path, quiet: bool = False, resume: bool = False) -> dict:
    """Run one job to completion in ``run_dir`` (or the rest of it, from its last checkpoint)."""
    start = _prepare_run_dir(cfg, run_dir, resume)
    servers = None
    children: list[Child] = []
    started = time.perf_counter()
    try:
        endpoints: dict = {"redis": [], "oracle": ""}
        if cfg.policy != "local":
            if cfg.redis_urls or cfg.redis_cluster_url:
                endpoints["redis"] = list(cfg.redis_urls) or [cfg.redis_cluster_url]
            else:
                from bagpipe.servers import RedisServers

                servers = RedisServers(cfg.store_config(), run_dir / "redis")
                servers.start()
                endpoints["redis"] = list(servers.urls)
            _fill_store(cfg, endpoints["redis"], run_dir, start)
            host = cfg.oracle_bind.split("//", 1)[-1].rsplit(":", 1)[0]
            endpoints["oracle"] = f"tcp://{host}:{free_port(host)}"
            children.append(_spawn("oracle", [sys.executable, "-m", "bagpipe", "oracle", "--run-dir", str(run_dir),
                                              "--endpoint", endpoints["oracle"], "--start", str(start)],
                                   run_dir / "oracle.log"))
        (run_dir / "endpoints.json").write_text(json.dumps(endpoints))
        trainer_cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                       "--nproc-per-node", str(cfg.trainers), "--master-addr", "127.0.0.1",
                       "--master-port", str(free_port()), "--module", "trainers.trainer", "--run-dir", str(run_dir),
                       "--start", str(start)]
        children.append(_spawn("trainers", trainer_cmd, run_dir / "trainers.log"))
        # Every pid this job started, for operators and for tests that check nothing is left behind.
        pids = {c.name: c.proc.pid for c in children}
        if servers is not None:
            pids.update({f"redis{i}": pid for i, pid in enumerate(servers.pids)})
        (run_dir / "pids.json").write_text(json.dumps(pids))
        _watch(children, run_dir, quiet)
    finally:
        _stop(children)
        if servers is not None:
            servers.stop()
    return _merge_metrics(cfg, run_dir, time.perf_counter() - started)


def _watch(children: list[Child], run_dir: Path, quiet: bool) -> None:
    """Wait for the trainers; stop at the first child that fails, naming it."""
    trainers = children[-1]
    log_path = run_dir / "trainers.log"
    shown = 0
    while True:
        if not quiet and log_path.exists():
            text = log_path.read_text(errors="replace")
            for line in text[shown:].splitlines():
                if "[trainer 0]" in line or "Error" in line:
                    print(line, file=sys.stderr)
            shown = len(text)
        for c in children:
            rc = c.proc.poll()
            if rc is not None and (rc != 0 or c is not trainers) and not (c.name == "oracle" and rc == 0):
                tail = (run_dir / f"{c.name}.log").read_text(errors="replace").strip().splitlines()[-8:]
                raise JobError(f"{c.name} (pid {c.proc.pid}) exited with code {rc}:\n  " + "\n  ".join(tail))
        if trainers.proc.poll() == 0:
            return
        time.sleep(0.2)


def _merge_metrics(cfg: RunConfig, run_dir: Path, wall_s: float) -> dict:
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(cfg.trainers)]
    iterations = ranks[0]["iterations"]
    ran = iterations - ranks[0].get("start", 0)  # a resumed launch runs only the rest
    train_wall = max(r["wall_s"] for r in ranks)
    metrics = {
        "policy": cfg.policy,
        "iterations": iterations,
        "resumed_from": ranks[0].get("start", 0) - 1 if ranks[0].get("start", 0) else None,
        "samples_per_s": ran * cfg.batch_size / max(train_wall, 1e-9),
        "wall_s": wall_s,
        "train_wall_s": train_wall,
        "train_logloss": ranks[0]["train_logloss"],
        "eval_auc": ranks[0].get("eval_auc"),
        "eval_logloss": ranks[0].get("eval_logloss"),
        "rows_fetched": sum(r["rows_fetched"] for r in ranks),
        "rows_written_back": sum(r["rows_written_back"] for r in ranks),
        "stall_s": max(r["stall_s"] for r in ranks),
        "peak_rss_bytes": {f"trainer{r['rank']}": r["peak_rss_bytes"] for r in ranks},
        "stall_per_iteration": ranks[0]["stall_per_iteration"],
    }
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, run_dir / "metrics.json")
    return metrics


def format_report(m: dict) -> str:
    auc = f"{m['eval_auc']:.4f}" if m.get("eval_auc") is not None else "n/a"
    return (f"policy {m['policy']}: {m['iterations']} iterations, {m['samples_per_s']:.0f} samples/s, "
            f"train logloss {m['train_logloss']:.4f}, eval AUC {auc}, stalled {m['stall_s']:.2f}s, "
            f"rows fetched {m['rows_fetched']}, written back {m['rows_written_back']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagpipe run", description="run a training job on this node")
    parser.add_argument("--config", type=Path, help="TOML config file (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--run-dir", type=Path, help="where logs, metrics and the model go (default runs/<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the job in --run-dir from its last checkpoint (its config.json, plus --set)")
    args = parser.parse_args(argv)
    init_logger("job")
    try:
        if args.resume:
            if args.run_dir is None or not (args.run_dir / "config.json").exists():
                raise JobError("--resume needs the --run-dir of an earlier run (with its config.json)")
            saved = json.loads((args.run_dir / "config.json").read_text())
            cfg = RunConfig.load(args.config, args.set) if args.config else RunConfig.from_dict(saved)
            if args.set and not args.config:
                cfg = RunConfig.load(None, [f"{k}={json.dumps(v)}" for k, v in saved.items()] + args.set)
        else:
            cfg = RunConfig.load(args.config, args.set)
        run_dir = args.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        metrics = run_job(cfg, run_dir, resume=args.resume)
    except (ConfigError, JobError, CheckpointError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; every process of the job was stopped")
        return 130
    print(format_report(metrics))
    print(f"run directory: {run_dir}")
    return 0
