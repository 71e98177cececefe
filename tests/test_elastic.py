"""Elastic resume: a checkpoint resumed with another shape trains the model of a run that never stopped.

What may change on resume (docs/checkpoints.md): the trainer count, the shard
count, sharded servers or a Redis Cluster, the policy and cache; what may not:
the fingerprint keys (a refused change names the key). And a shard lost while
persistence is off stops the job within the store timeout, naming the shard
and the checkpoint to resume from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bagpipe.checkpoint import CheckpointError
from bagpipe.config import RunConfig
from bagpipe.runner.check import compare_models, identical
from bagpipe.runner.export import load_model
from bagpipe.runner.job import run_job
from procs import wait_gone

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TOTAL, FIRST = 24, 8  # iterations in all; the first launch stops after its checkpoint at iteration 7
BASE = ["batch_size=192", f"iterations={TOTAL}", "checkpoint_every=8", "cache_rows=2500", "lead=2", "horizon=4",
        "eval_batches=1", "policy=\"bagpipe\"", "trainers=1", "shards=2"]


def _cfg(data: Path, **changes) -> RunConfig:
    return RunConfig.load(None, [f"data={data}", *BASE]).replace(**changes)


@pytest.fixture(scope="module")
def runs(small_criteo, tmp_path_factory):
    """The uninterrupted run and the first launches (8 iterations, checkpoint at 7) to resume from."""
    root = tmp_path_factory.mktemp("elastic")
    out = {}
    run_job(_cfg(small_criteo), root / "uninterrupted", quiet=True)
    out["uninterrupted"] = load_model(root / "uninterrupted")
    for name, changes in {"sharded": {}, "cluster": {"shards": 3, "redis_cluster": True},
                          "local": {"policy": "local"}}.items():
        run_job(_cfg(small_criteo, iterations=FIRST, **changes), root / f"first-{name}", quiet=True)
    out["root"] = root
    return out


def _resume(runs, small_criteo, tmp_path, first: str, **changes) -> dict:
    """Copy a first launch's run directory and resume it to TOTAL iterations with these changes."""
    rd = tmp_path / "resumed"
    shutil.copytree(runs["root"] / f"first-{first}", rd)
    saved = json.loads((rd / "config.json").read_text())
    cfg = RunConfig.from_dict(saved).replace(iterations=TOTAL, **changes)
    metrics = run_job(cfg, rd, quiet=True, resume=True)
    assert metrics["resumed_from"] == FIRST - 1
    return load_model(rd)


def _same(a: dict, b: dict) -> None:
    cmp = compare_models(a, b)
    assert cmp.rows > 0 and identical(a, b), (cmp.max_abs, cmp.problems)


@pytest.mark.parametrize("changes", [{"shards": 3}, {"shards": 1}, {"shards": 3, "redis_cluster": True}],
                         ids=["2->3 shards", "2->1 shards", "shards->cluster"])
def test_one_trainer_resumed_on_other_servers_equals_the_uninterrupted_run(runs, small_criteo, tmp_path, changes):
    _same(runs["uninterrupted"], _resume(runs, small_criteo, tmp_path, "sharded", **changes))


def test_cluster_resumed_on_sharded_servers_equals_the_uninterrupted_run(runs, small_criteo, tmp_path):
    _same(runs["uninterrupted"], _resume(runs, small_criteo, tmp_path, "cluster", shards=2, redis_cluster=False))


@pytest.mark.parametrize("trainers", [2, 3])
def test_resumed_with_more_trainers_equals_local_resumed_the_same_way(runs, small_criteo, tmp_path, trainers):
    """1 trainer for 8 iterations, then N: bit for bit the synchronous reference that did the same
    (from the checkpoint on, N ranks sum in N-rank order, as local with N does)."""
    cached = _resume(runs, small_criteo, tmp_path, "sharded", trainers=trainers, shards=3)
    shutil.rmtree(tmp_path / "resumed")
    reference = _resume(runs, small_criteo, tmp_path, "local", trainers=trainers)
    _same(reference, cached)


def test_a_change_that_makes_another_model_is_refused_naming_the_key(runs, small_criteo, tmp_path):
    for key, value in (("lr", 0.5), ("seed", 7), ("batch_size", 96)):
        with pytest.raises(CheckpointError, match=f"config key '{key}'"):
            _resume(runs, small_criteo, tmp_path, "sharded", **{key: value})
        shutil.rmtree(tmp_path / "resumed")


def test_a_shard_lost_without_persistence_stops_the_job_naming_it_and_the_checkpoint(runs, small_criteo, tmp_path):
    """Persistence off: the killed shard's rows are gone; the job stops within the store timeout,
    names the shard's host:port and the last checkpoint, and the resume from it is bit for bit."""
    rd = tmp_path / "run"
    sets = [a for s in BASE + ["redis_persistence=\"off\"", "redis_timeout_s=2", "store_latency_us=3000"]
            for a in ("--set", s)]
    job = subprocess.Popen([sys.executable, "-m", "bagpipe", "run", "--run-dir", str(rd), "--set",
                            f"data={small_criteo}", *sets], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (rd / "checkpoints" / "LATEST").exists():
            assert job.poll() is None, job.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.1)
        endpoints = json.loads((rd / "endpoints.json").read_text())
        pids = json.loads((rd / "pids.json").read_text())
        victim = endpoints["redis"][1]
        port = re.search(r"//[^:/]+:(\d+)", victim).group(1)
        os.kill(pids["redis1"], signal.SIGKILL)
        killed_at = time.monotonic()
        out, _ = job.communicate(timeout=120)
        stopped_after = time.monotonic() - killed_at
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode != 0
    # Within the store timeout (2 s) plus the stop of the other processes (torchrun, the oracle).
    assert stopped_after < 30, stopped_after
    assert f"127.0.0.1:{port}" in out, out[-3000:]
    latest = (rd / "checkpoints" / (rd / "checkpoints" / "LATEST").read_text().strip())
    assert f"the last checkpoint is {rd / 'checkpoints'}" in out and "--resume" in out, out[-3000:]
    assert wait_gone(list(pids.values()), 20.0) == []
    assert latest.exists()
    cfg = RunConfig.from_dict(json.loads((rd / "config.json").read_text()))
    run_job(cfg, rd, quiet=True, resume=True)
    _same(runs["uninterrupted"], load_model(rd))  # persistence and latency do not change the model
