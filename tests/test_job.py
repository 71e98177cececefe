"""Whole jobs through real processes: redis-server shards, the oracle, torchrun trainers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bagpipe.config import RunConfig
from bagpipe.runner.export import load_model
from bagpipe.runner.job import run_job
from procs import wait_gone

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_bagpipe_job_trains_learns_and_cleans_up(small_criteo, tmp_path):
    cfg = RunConfig(data=str(small_criteo), policy="bagpipe", trainers=2, shards=2, batch_size=256,
                    iterations=40, cache_rows=3000, lead=2, horizon=6, eval_batches=4)
    metrics = run_job(cfg, tmp_path / "run", quiet=True)
    for key in ("samples_per_s", "iterations", "wall_s", "train_logloss", "eval_auc", "eval_logloss",
                "rows_fetched", "rows_written_back", "stall_s", "peak_rss_bytes"):
        assert key in metrics, key
    assert metrics["iterations"] == 40
    assert metrics["rows_fetched"] > 0 and metrics["rows_written_back"] > 0
    # The synthetic labels follow a hidden model: 40 steps already beat a coin.
    assert metrics["eval_auc"] > 0.55
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["rows_fetched"] == metrics["rows_fetched"]
    model = load_model(tmp_path / "run")
    assert len(model["tables"]) == 26 and sum(len(t["ids"]) for t in model["tables"].values()) > 0
    pids = json.loads((tmp_path / "run" / "pids.json").read_text())
    assert {"oracle", "trainers", "redis0", "redis1"} <= set(pids)
    assert wait_gone(list(pids.values()), 2.0) == []


@pytest.mark.slow
@pytest.mark.extended
def test_every_policy_trains_the_local_model(small_criteo, tmp_path):
    """One trainer: each policy's exported model is bitwise the all-in-memory one, in-process.

    In make test-extended only: make test's small matrix (tests/test_check.py) checks the same
    bit for bit for every policy, through the command a user runs."""
    base = RunConfig(data=str(small_criteo), trainers=1, shards=2, batch_size=128, iterations=12,
                     cache_rows=2500, lead=2, horizon=4, eval_batches=2)
    run_job(base.replace(policy="local"), tmp_path / "local", quiet=True)
    ref = load_model(tmp_path / "local")
    aucs = {}
    for policy in ("none", "lru", "lfu", "lru-prefetch", "static", "bagpipe", "bagpipe-original"):
        m = run_job(base.replace(policy=policy), tmp_path / policy, quiet=True)
        got = load_model(tmp_path / policy)
        for name, tensor in ref["dense"].items():
            assert got["dense"][name].equal(tensor), (policy, name)
        for table, rows in ref["tables"].items():
            assert got["tables"][table]["ids"].equal(rows["ids"]), (policy, table)
            assert got["tables"][table]["weights"].equal(rows["weights"]), (policy, table)
            assert got["tables"][table]["state"].equal(rows["state"]), (policy, table)
        aucs[policy] = m["eval_auc"]
    assert len(set(aucs.values())) == 1, aucs


def test_killed_trainer_ends_the_job_with_a_clear_error(small_criteo, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "bagpipe", "run", "--run-dir", str(run_dir),
           "--set", f"data={small_criteo}", "--set", "trainers=2", "--set", "batch_size=128",
           "--set", "iterations=280", "--set", "cache_rows=3000", "--set", "store_latency_us=2000",
           "--set", "eval_batches=1"]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        victim = run_dir / "rank1.pid"
        while not victim.exists() or not (run_dir / "pids.json").exists():
            assert job.poll() is None, job.stdout.read()
            assert time.monotonic() < deadline, "trainers never started"
            time.sleep(0.2)
        time.sleep(3)  # let it train a little
        pids = json.loads((run_dir / "pids.json").read_text())
        os.kill(int(victim.read_text()), signal.SIGKILL)
        out, _ = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode != 0
    assert "trainers" in out and "exited with code" in out, out[-2000:]
    others = [int((run_dir / "rank0.pid").read_text())] + list(pids.values())
    assert wait_gone(others, 10.0) == []


def test_several_epochs_run_as_one_plan_stream(small_criteo, tmp_path):
    """Two epochs, the boundary inside the run: bagpipe still trains exactly the all-in-memory model."""
    from bagpipe.dataset import Dataset

    per_epoch = len(Dataset(str(small_criteo)).sparse_batches(4096, seed=0))
    iterations = per_epoch + 3
    base = RunConfig(data=str(small_criteo), trainers=1, shards=1, batch_size=4096, iterations=iterations,
                     epochs=2, cache_rows=30000, lead=2, horizon=4, eval_batches=1)
    run_job(base.replace(policy="local"), tmp_path / "local", quiet=True)
    m = run_job(base.replace(policy="bagpipe"), tmp_path / "bagpipe", quiet=True)
    assert m["iterations"] == iterations
    ref, got = load_model(tmp_path / "local"), load_model(tmp_path / "bagpipe")
    for name, tensor in ref["dense"].items():
        assert got["dense"][name].equal(tensor), name
    for table, rows in ref["tables"].items():
        assert got["tables"][table]["weights"].equal(rows["weights"]), table
    with pytest.raises(Exception, match=r"'iterations': .* in 2 epoch\(s\)"):
        run_job(base.replace(iterations=2 * per_epoch + 1), tmp_path / "too-long", quiet=True)
