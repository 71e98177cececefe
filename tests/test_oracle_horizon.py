"""horizon = "auto": the window the oracle chooses, its bounds, the keys' checks, and plans that
are the fixed horizon's plans (the reference and the compiled planner agree on it)."""

from __future__ import annotations

import numpy as np
import pytest

from bagpipe.config import ConfigError, RunConfig
from oracle import planner as fast
from oracle import reference as ref
from oracle.horizon import COVER, choose_horizon, window_bytes
from tests.test_planner_fast import _assert_same, _trace


def _fresh_rows(iterations: int, batch: int, per_iteration: int) -> list[np.ndarray]:
    """Batches of one table where iteration i reads rows [i*per, (i+1)*per) only: distinct rows
    grow by exactly ``per_iteration`` each iteration."""
    out = []
    for i in range(iterations):
        out.append((i * per_iteration + np.arange(batch) % per_iteration).reshape(batch, 1).astype(np.int64))
    return out


def test_auto_stops_when_the_window_covers_the_cache():
    data = _fresh_rows(200, 40, 10)
    choice = choose_horizon(data, cache_rows=50, trainers=1, lead=2, iterations=200, memory_mb=1024)
    # Batches 0..h hold 10 (h + 1) distinct rows; the first h with >= COVER * 50 of them.
    want = -(-COVER * 50 // 10) - 1
    assert (choice.horizon, choice.reason, choice.window_rows) == (want, "cover", 10 * (want + 1))
    assert choice.window_bytes == window_bytes(40, 1, want, 10 * (want + 1))


def test_auto_is_bounded_by_memory_lead_and_the_run():
    data = _fresh_rows(200, 40, 10)
    whole = choose_horizon(data, cache_rows=10**6, trainers=1, lead=2, iterations=200, memory_mb=1024)
    assert (whole.horizon, whole.reason) == (199, "iterations")
    budget_mb = window_bytes(40, 1, 30, 310) / 2**20  # exactly what horizon 30 takes
    tight = choose_horizon(data, cache_rows=10**6, trainers=1, lead=2, iterations=200, memory_mb=budget_mb)
    assert (tight.horizon, tight.reason) == (30, "memory")
    assert tight.window_bytes <= budget_mb * 2**20
    tiny = choose_horizon(data, cache_rows=1, trainers=1, lead=5, iterations=200, memory_mb=1024)
    assert tiny.horizon == 5  # never below the lead, however small the cache


def test_auto_counts_each_trainers_rows():
    # Trainer 1 reads one hot row only: its window never covers the cache, so the run's end bounds it.
    data = [np.concatenate([d, np.zeros_like(d)]) for d in _fresh_rows(60, 20, 10)]
    choice = choose_horizon(data, cache_rows=5, trainers=2, lead=1, iterations=60, memory_mb=1024)
    assert (choice.horizon, choice.reason) == (59, "iterations")


@pytest.mark.parametrize("policy", ["bagpipe", "lru", "bagpipe-original"])
def test_auto_plans_are_the_chosen_fixed_horizons_plans(policy):
    data = _trace(7, 30, 12, 3, 400, 1.3)
    auto = ref.PlannerConfig(policy, 60, 2, "auto", 2, 12, len(data))
    _assert_same(auto, data)  # the compiled planner against the reference, both choosing
    chosen = fast.Planner(auto, data)
    assert chosen.horizon_choice.reason != "fixed" and chosen.cfg.horizon >= 2
    fixed = ref.PlannerConfig(policy, 60, 2, chosen.cfg.horizon, 2, 12, len(data))
    a = [[vars(p) for p in plans] for _, plans in fast.Planner(auto, data).plans()]
    b = [[vars(p) for p in plans] for _, plans in fast.Planner(fixed, data).plans()]
    assert len(a) == len(b) == len(data)
    for pa, pb in zip(a, b):
        for x, y in zip(pa, pb):
            assert x.keys() == y.keys()
            for k in x:
                assert np.array_equal(np.asarray(x[k]), np.asarray(y[k])), k


def test_auto_is_the_default_and_the_keys_are_checked():
    cfg = RunConfig.load(None, [])
    assert cfg.horizon == "auto" and cfg.oracle_config().horizon == "auto"
    assert RunConfig.load(None, ["horizon=16"]).oracle_config().horizon == 16
    assert RunConfig.load(None, ["oracle_memory_mb=64"]).oracle_config().memory_mb == 64
    for bad, key in (("horizon=soon", "horizon"), ("horizon=2.5", "horizon"), ("horizon=1", "horizon"),
                     ("oracle_memory_mb=0", "oracle_memory_mb"), ("oracle_memory_mb=-3", "oracle_memory_mb")):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            RunConfig.load(None, [bad])


@pytest.mark.slow
def test_an_auto_horizon_job_trains_the_local_model(small_criteo, tmp_path):
    """One trainer, the default horizon, two checkpoint segments (each chooses its own): the exported
    model is bitwise the all-in-memory one, and the oracle reports the window it chose."""
    import json

    from bagpipe.runner.export import load_model
    from bagpipe.runner.job import run_job

    base = RunConfig(data=str(small_criteo), trainers=1, shards=2, batch_size=128, iterations=12,
                     cache_rows=2500, lead=2, eval_batches=1, checkpoint_every=6)
    assert base.horizon == "auto"
    run_job(base.replace(policy="local"), tmp_path / "local", quiet=True)
    run_job(base.replace(policy="bagpipe"), tmp_path / "auto", quiet=True)
    want, got = load_model(tmp_path / "local"), load_model(tmp_path / "auto")
    for name, tensor in want["dense"].items():
        assert got["dense"][name].equal(tensor), name
    for table, rows in want["tables"].items():
        for part in ("ids", "weights", "state"):
            assert got["tables"][table][part].equal(rows[part]), (table, part)
    stats = json.loads((tmp_path / "auto" / "oracle_stats.json").read_text())
    assert stats[0]["horizon_reason"] in ("cover", "iterations") and stats[0]["horizon"] >= 2
    assert 0 < stats[0]["window_mb"] <= stats[0]["oracle_memory_mb"] == 1024
