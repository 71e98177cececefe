"""The store agent against a real redis-server: same answers as StoreIO, bounded rings, a death named."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from bagpipe.config import RunConfig
from bagpipe.dataset import Dataset
from bagpipe.keys import initial_rows, make_keys
from bagpipe.rundir import RunDir
from trainers.storeagent import StoreAgent
from trainers.storeio import StoreIOError

DIM = 16


@pytest.fixture
def run(small_criteo, redis_servers, tmp_path):
    """A run directory as the runner leaves it for a trainer: config, job id, endpoints."""
    servers = redis_servers(2)
    run = RunDir(tmp_path / "run")
    run.create()
    cfg = RunConfig(data=str(small_criteo), embedding_dim=DIM, bottom_mlp=(8, DIM), plan_timeout_s=5.0)
    run.write_config(cfg.to_dict())
    run.write_endpoints({"redis": servers.urls, "redis_cluster_url": "", "oracle": ""})
    return run


def _sizes(run: RunDir) -> np.ndarray:
    return np.array([n for _, n in Dataset(run.read_config()["data"]).tables])


def test_agent_fetches_writes_back_and_drains_through_small_rings(run):
    width = DIM + 1
    # 64 KiB rings: a 3000-row write-back and fetch go in many chunks, waiting for room.
    agent = StoreAgent(str(run.path), 0, width, 10.0, 64 << 10)
    try:
        keys = make_keys(np.arange(3000) % 3, np.arange(3000) // 3)
        agent.fetch(0, keys, np.full(len(keys), -1, np.int64))
        first = agent.take(np.arange(3000)[::-1])
        assert np.array_equal(first, initial_rows(keys, DIM, 1, 0, _sizes(run))[::-1])
        new = np.random.default_rng(0).standard_normal((3000, width)).astype(np.float32)
        agent.write_back(keys, new, 4)
        agent.mark_iteration(4)
        agent.fetch(3000, keys, np.full(len(keys), 4, np.int64))  # must see the write-back
        assert np.array_equal(agent.take(np.arange(3000, 6000)), new)
        agent.drain()
        assert agent.written_through == 4
        with pytest.raises(StoreIOError, match="never issued or already used"):
            agent.take(np.array([7]))
    finally:
        agent.close()
    assert agent.proc.poll() is not None


def test_a_killed_agent_is_named_within_the_timeout(run):
    agent = StoreAgent(str(run.path), 3, DIM + 1, 5.0, 1 << 20)
    try:
        os.kill(agent.pid, signal.SIGKILL)
        t0 = time.monotonic()
        agent.fetch(0, make_keys(0, np.arange(5)), np.full(5, -1, np.int64))
        with pytest.raises(StoreIOError, match=rf"store agent of rank 3 \(pid {agent.pid}\) exited with code -9"):
            agent.take(np.arange(5))
        assert time.monotonic() - t0 < 5.0
    finally:
        agent.close()


def test_agent_reports_a_version_that_never_comes(run):
    agent = StoreAgent(str(run.path), 0, DIM + 1, 1.0, 1 << 20)
    try:
        key = make_keys(1, np.array([9]))
        agent.fetch(0, key, np.array([7], np.int64))
        with pytest.raises(StoreIOError, match=f"row key {int(key[0])} still has version -1 < 7"):
            agent.take(np.array([0]))
    finally:
        agent.close()
