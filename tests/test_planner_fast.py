"""The compiled planner (oracle.planner) against the executable specification (oracle.reference).

Every array of every plan, every scalar, the stats and the errors must be
identical, for every policy, one to three trainers, any lead and horizon,
and capacities from the smallest workable one to everything-fits.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bagpipe.policies import PLANNED
from bagpipe.wire import Plan
from oracle import planner as fast
from oracle import reference as ref


def _trace(seed: int, iterations: int, batch: int, tables: int, rows: int, skew: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.zipf(skew, size=(batch, tables)) - 1) % rows for _ in range(iterations)]


def _run(impl, cfg, data, ack_lag: int | None = None):
    """All plans, the stats, and the error message if planning stopped on one."""
    out = []
    try:
        planner = impl.Planner(cfg, data)
        for i, plans in planner.plans():
            out.append((i, plans))
            if ack_lag is not None:
                planner.note_writebacks_applied(i - ack_lag)
    except impl.PlanError as exc:
        return out, None, str(exc)
    return out, [vars(s) for s in planner.stats], None


def _assert_same(cfg, data, ack_lag: int | None = None) -> None:
    want, want_stats, want_err = _run(ref, cfg, data, ack_lag)
    got, got_stats, got_err = _run(fast, cfg, data, ack_lag)
    assert got_err == want_err
    assert len(got) == len(want)
    for (i, plans_w), (j, plans_g) in zip(want, got):
        assert i == j
        assert len(plans_w) == len(plans_g)
        for t, (w, g) in enumerate(zip(plans_w, plans_g)):
            assert (g.iteration, g.rank) == (w.iteration, w.rank)
            for name, _ in Plan.ARRAYS:
                a, b = getattr(w, name), getattr(g, name)
                assert b.dtype == a.dtype and b.shape == a.shape, (i, t, name, a.dtype, a.shape, b.dtype, b.shape)
                assert np.array_equal(a, b), (i, t, name, a, b)
            for name in Plan.SCALARS:
                assert getattr(g, name) == getattr(w, name), (i, t, name)
    assert got_stats == want_stats


def _min_capacity(data, trainers, batch):
    return ref.Planner(ref.PlannerConfig("lru", 1 << 30, 0, 0, trainers, batch, len(data)), data).min_cache_rows()


@settings(max_examples=120, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    policy=st.sampled_from(PLANNED),
    trainers=st.sampled_from([1, 2, 3]),
    lead=st.integers(0, 4),
    extra_horizon=st.integers(0, 6),
    slack=st.sampled_from([-1, 0, 0, 1, 3, 20, 10_000]),
    skew=st.sampled_from([1.1, 1.3, 1.6, 3.0]),
    shape=st.sampled_from([(25, 6, 3, 40), (40, 4, 2, 15), (12, 10, 4, 400)]),
)
def test_fast_planner_matches_the_reference(seed, policy, trainers, lead, extra_horizon, slack, skew, shape):
    iterations, per_trainer, tables, rows = shape
    batch = per_trainer * trainers
    data = _trace(seed, iterations, batch, tables, rows, skew)
    capacity = max(1, _min_capacity(data, trainers, batch) + slack)
    if policy == "static" and slack >= 0:
        capacity += 3 * batch  # room for pinned rows beside one batch's scratch
    _assert_same(fast.PlannerConfig(policy, capacity, lead, lead + extra_horizon, trainers, batch, iterations), data)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), policy=st.sampled_from(["bagpipe", "lru", "lfu", "lru-prefetch"]),
       ack_lag=st.integers(0, 3), slack=st.sampled_from([0, 5, 50]))
def test_acknowledged_writebacks_give_the_same_versions(seed, policy, ack_lag, slack):
    """Versions named by fetches follow the trainers' acknowledgements exactly as in the reference."""
    data = _trace(seed, 30, 8, 2, 30, 1.3)
    capacity = _min_capacity(data, 2, 8) + slack
    _assert_same(fast.PlannerConfig(policy, capacity, 2, 4, 2, 8, 30), data, ack_lag)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_long_runs_reach_the_high_frequency_paths(seed):
    """Rows used in 64+ iterations of one residency leave the per-frequency queues for the heap."""
    data = _trace(seed, 160, 6, 2, 25, 1.4)
    capacity = _min_capacity(data, 1, 6)
    for policy in ("bagpipe", "lfu"):
        for slack in (0, 4):
            _assert_same(fast.PlannerConfig(policy, capacity + slack, 2, 3, 1, 6, 160), data)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), trainers=st.sampled_from([1, 2, 3]), lead=st.integers(0, 3),
       extra_horizon=st.sampled_from([0, 2, 8, 40]), slack=st.sampled_from([0, 1, 4, 15]), bypass=st.booleans(),
       skew=st.sampled_from([1.1, 1.3, 2.0]))
def test_bypass_matches_the_reference(seed, trainers, lead, extra_horizon, slack, bypass, skew):
    """The scratch area: which rows bypass, their slots past the cache, their evictions and write-backs."""
    batch = 6 * trainers
    data = _trace(seed, 30, batch, 3, 120, skew)
    capacity = _min_capacity(data, trainers, batch) + slack
    _assert_same(fast.PlannerConfig("bagpipe", capacity, lead, lead + extra_horizon, trainers, batch, 30,
                                    bypass=bypass), data)


@pytest.mark.parametrize("trainers", [1, 3])
def test_bypass_is_exercised_and_saves_fetches(trainers):
    """Not a vacuous comparison: rows do bypass here, in the fast planner and the reference alike."""
    batch = 8 * trainers
    data = _trace(5, 60, batch, 3, 300, 1.2)
    capacity = _min_capacity(data, trainers, batch) + 4
    fetched = {}
    for bypass in (False, True):
        cfg = fast.PlannerConfig("bagpipe", capacity, 2, 6, trainers, batch, 60, bypass=bypass)
        _assert_same(cfg, data)
        planner = fast.Planner(cfg, data)
        for _ in planner.plans():
            pass
        bypassed = sum(s.rows_bypassed for s in planner.stats)
        assert (bypassed > 0) == bypass
        fetched[bypass] = sum(s.rows_fetched for s in planner.stats)
    assert fetched[True] < fetched[False]


@pytest.mark.parametrize("policy", ["bagpipe", "lru"])
def test_large_zipf_trace_matches_the_reference(policy):
    """Bench-like shape: 26 tables, a skewed trace spread over a large table, evictions and deferrals."""
    rng = np.random.default_rng(7)
    data = [((rng.zipf(1.15, size=(512, 26)) - 1) * 7919) % 1_000_000 for _ in range(30)]
    capacity = _min_capacity(data, 2, 512) * 3 // 2
    cfg = fast.PlannerConfig(policy, capacity, 2, 8, 2, 512, 30)
    _assert_same(cfg, data)
    planner = fast.Planner(cfg, data)
    for _ in planner.plans():
        pass
    assert sum(s.rows_written_back for s in planner.stats) > 0


def test_pinned_rows_and_min_cache_rows_match_the_reference():
    data = _trace(11, 20, 12, 3, 60, 1.3)
    for trainers in (1, 2, 3):
        cfg = fast.PlannerConfig("static", 80, 0, 0, trainers, 12, 20)
        assert fast.pinned_rows(cfg, data) == ref.pinned_rows(cfg, data)
        assert fast.Planner(cfg, data).min_cache_rows() == ref.Planner(cfg, data).min_cache_rows()


def test_errors_match_the_reference():
    data = _trace(0, 10, 16, 3, 1000, 1.2)
    need = _min_capacity(data, 1, 16)
    _assert_same(fast.PlannerConfig("bagpipe", need - 1, 2, 4, 1, 16, 10), data)
    bad = data[:4] + [data[4][:15]] + data[5:]  # a short batch
    _assert_same(fast.PlannerConfig("lru", need + 5, 1, 3, 1, 16, 10), bad)
    pinned_everywhere = [set(range(200))]
    for impl in (ref, fast):  # static with a pinned set that leaves no room: refused in the same place
        planner = impl.Planner(impl.PlannerConfig("static", need, 0, 0, 1, 16, 10), data, pinned_everywhere)
        with pytest.raises(impl.PlanError, match="found no room"):
            list(planner.plans())
