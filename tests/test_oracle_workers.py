"""Partitions planned in worker processes (``oracle_workers``): the same plans, a stopped worker named."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import zmq

from bagpipe.auth import hello_token, write_secret
from bagpipe.config import ConfigError, RunConfig
from bagpipe.runner.check import compare_models, identical
from bagpipe.runner.export import load_model
from bagpipe.runner.job import run_job
from bagpipe.wire import Hello, encode_control
from oracle.workers import WorkerError, WorkerServer, owner_of, partitions_of, worker_job
from procs import finish, start_job, wait_for_checkpoint, wait_gone

SETTINGS = {"trainers": 2, "batch_size": 128, "iterations": 24, "checkpoint_every": 8, "cache_rows": 2500,
            "lead": 2, "horizon": 4, "eval_batches": 1}


def _cfg(data: Path, **changes) -> RunConfig:
    return RunConfig.load(None, [f"data={data}"] + [f"{k}={v}" for k, v in dict(SETTINGS, **changes).items()])


def test_partitions_are_dealt_to_the_oracle_and_its_workers():
    assert [owner_of(p, 2) for p in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert partitions_of(0, 7, 2) == [0, 3, 6] and partitions_of(2, 7, 2) == [2, 5]
    assert RunConfig.load(None, ["oracle_partitions=4", "oracle_workers=3"]).oracle_config().workers == 3
    with pytest.raises(ConfigError, match="oracle_workers.*need oracle_partitions >= 3"):
        RunConfig.load(None, ["oracle_partitions=2", "oracle_workers=2"])
    with pytest.raises(ConfigError, match="oracle_workers"):
        RunConfig.load(None, ["oracle_workers=-1"])


def test_a_worker_serves_only_the_oracle_of_its_job(tmp_path):
    """A stranger's hello (no token, or a trainer's token) is dropped and counted, never served."""
    secret = write_secret(tmp_path / "secret")
    server = WorkerServer(1, "tcp://127.0.0.1:0", "job-a", secret, timeout_s=1.0, max_ahead=4)
    ctx = zmq.Context()
    try:
        stranger = ctx.socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        stranger.connect(server.endpoint)
        stranger.send_multipart(encode_control(Hello(rank=1, token="guess"), "job-a"))
        stranger.send_multipart(encode_control(Hello(rank=1, token=hello_token(secret, "job-a", 1)), "job-a"))
        with pytest.raises(WorkerError, match=f"never connected to oracle worker 1 at {server.endpoint}"):
            server.wait_for_oracle()
        assert server.dropped == 2 and server.oracle is None
        oracle = ctx.socket(zmq.DEALER)
        oracle.setsockopt(zmq.LINGER, 0)
        oracle.connect(server.endpoint)
        oracle.send_multipart(encode_control(Hello(rank=1, token=hello_token(secret, worker_job("job-a"), 1)),
                                             "job-a"))
        server.wait_for_oracle()
        assert server.oracle is not None
    finally:
        server.close()
        for s in (stranger, oracle):
            s.close()
        ctx.term()


@pytest.mark.slow
def test_worker_processes_plan_what_one_oracle_plans(small_criteo, tmp_path):
    """Three partitions in the oracle's threads, or spread over one or two worker processes: the
    same plans (the same rows fetched), and bitwise the model of ``local`` with two trainers."""
    local = run_job(_cfg(small_criteo, policy="local"), tmp_path / "local", quiet=True)
    assert local["iterations"] == 24
    runs = {}
    for workers in (0, 1, 2):
        runs[workers] = run_job(_cfg(small_criteo, policy="bagpipe", oracle_partitions=3, oracle_workers=workers),
                                tmp_path / f"w{workers}", quiet=True)
    assert runs[0]["rows_fetched"] > 0
    assert runs[1]["rows_fetched"] == runs[0]["rows_fetched"] == runs[2]["rows_fetched"]
    ref = load_model(tmp_path / "local")
    for workers in (0, 1, 2):
        got = load_model(tmp_path / f"w{workers}")
        assert identical(ref, got), (workers, compare_models(ref, got).problems)
    log = (tmp_path / "w2" / "oracle-worker2.log").read_text()
    assert "planning partitions [2] of 3" in log
    assert "1 planned here and 2 by 2 worker process(es)" in (tmp_path / "w2" / "oracle.log").read_text()


@pytest.mark.slow
def test_a_killed_worker_stops_the_job_naming_it_and_a_resume_reaches_the_same_model(small_criteo, tmp_path):
    # max_ahead 2: the worker (held to it by credits) still has iterations to plan when it is killed after the
    # first checkpoint; with the default 16 it could be done with all 24 by then, and the job would rightly finish.
    settings = dict(SETTINGS, policy="bagpipe", oracle_partitions=2, oracle_workers=1, store_latency_us=3000,
                    max_ahead=2)
    run_job(_cfg(small_criteo, **{k: v for k, v in settings.items() if k not in SETTINGS}), tmp_path / "ref",
            quiet=True)
    run_dir = tmp_path / "run"
    job = start_job(run_dir, small_criteo, settings)
    wait_for_checkpoint(job, run_dir)
    pids = json.loads((run_dir / "pids.json").read_text())
    os.kill(pids["oracle-worker1"], signal.SIGKILL)
    killed = time.monotonic()
    rc, out = finish(job, timeout_s=90)
    assert rc != 0
    assert time.monotonic() - killed < 60
    assert f"oracle-worker1 (pid {pids['oracle-worker1']}) exited with code -9" in out, out[-3000:]
    assert wait_gone(list(pids.values()), 20.0) == []
    rc, out = finish(start_job(run_dir, small_criteo, {}, resume=True))
    assert rc == 0, out[-3000:]
    ref, got = load_model(tmp_path / "ref"), load_model(run_dir)
    assert identical(ref, got), compare_models(ref, got).problems
