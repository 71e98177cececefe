"""The offline simulation predicts what the live job fetches; bad sizes are refused before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bagpipe.config import ConfigError, RunConfig
from bagpipe.runner.job import run_job

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("policy, trainers", [("bagpipe", 2), ("lru", 1)])
def test_live_job_fetches_what_simulate_predicts(small_criteo, tmp_path, policy, trainers):
    cfg = RunConfig(data=str(small_criteo), policy=policy, trainers=trainers, batch_size=192, iterations=15,
                    cache_rows=2000, lead=2, horizon=5, eval_batches=1)
    metrics = run_job(cfg, tmp_path / "run", quiet=True)
    out = subprocess.run([sys.executable, "-m", "bagpipe", "simulate", "--data", str(small_criteo),
                          "--batch-size", "192", "--cache-rows", "2000", "--trainers", str(trainers),
                          "--lead", "2", "--horizon", "5", "--iterations", "15", "--policies", f"{policy},belady",
                          "--json"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    report = json.loads(out)
    assert report[policy]["rows_fetched"] == metrics["rows_fetched"]
    assert report[policy]["rows_written_back"] == metrics["rows_written_back"]
    # MIN bounds each trainer's cache insertions: from the store, or joined from another trainer's cache.
    assert report["belady"]["rows_fetched"] <= report[policy]["rows_fetched"] + report[policy]["rows_joined"]


def test_too_small_a_cache_is_refused_before_anything_starts(small_criteo, tmp_path):
    cfg = RunConfig(data=str(small_criteo), policy="bagpipe", trainers=1, batch_size=192, iterations=5,
                    cache_rows=100)
    with pytest.raises(ConfigError, match=r"'cache_rows': 100 is too small.*smallest workable cache_rows is at least"):
        run_job(cfg, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "pids.json").exists()


def test_more_iterations_than_batches_is_refused(small_criteo, tmp_path):
    cfg = RunConfig(data=str(small_criteo), policy="lru", trainers=1, batch_size=192, iterations=10_000,
                    cache_rows=5000)
    with pytest.raises(ConfigError, match="'iterations': 10000 >"):
        run_job(cfg, tmp_path / "run", quiet=True)
