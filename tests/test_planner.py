"""The planner's invariants, on hypothesis-generated traces, checked by executing the plans."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bagpipe.policies import PLANNED, policy as policy_row
from bagpipe.wire import Plan
from oracle.planner import Planner, PlannerConfig, PlanError, PlanStats
from oracle.replay import ReplayError, replay
from oracle.simulate import belady_fetches
from oracle.staging import stage_fetches


def _trace(seed: int, iterations: int, batch: int, tables: int, rows: int, skew: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.zipf(skew, size=(batch, tables)) - 1) % rows for _ in range(iterations)]


def _min_capacity(data, trainers, batch):
    cfg = PlannerConfig("lru", 1 << 30, 0, 0, trainers, batch, len(data))
    return Planner(cfg, data).min_cache_rows()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    policy=st.sampled_from(PLANNED),
    trainers=st.sampled_from([1, 2, 3]),
    lead=st.integers(0, 3),
    extra_horizon=st.integers(0, 4),
    slack=st.sampled_from([0, 3, 20, 10_000]),
    skew=st.sampled_from([1.2, 1.6, 3.0]),
)
def test_plans_are_consistent_and_bounded(seed, policy, trainers, lead, extra_horizon, slack, skew):
    batch = 6 * trainers
    data = _trace(seed, 25, batch, 3, 40, skew)
    capacity = _min_capacity(data, trainers, batch) + slack
    if policy == "static":
        capacity += 3 * batch  # room for pinned rows beside one batch's scratch
    cfg = PlannerConfig(policy, capacity, lead, lead + extra_horizon, trainers, batch, len(data))
    planner = Planner(cfg, data)
    bounded = policy_row(policy).bounded
    # replay checks: capacity, every read resident in its slot, no stale read,
    # versions, and the final rows equal one table trained on the same batches.
    replay(planner.plans(), data, trainers, batch, capacity if bounded else None)


def test_too_small_cache_is_refused_with_the_smallest_workable_size():
    data = _trace(0, 10, 16, 3, 1000, 1.2)
    need = _min_capacity(data, 1, 16)
    with pytest.raises(PlanError, match=f"smallest workable cache_rows is {need}"):
        list(Planner(PlannerConfig("bagpipe", need - 1, 2, 4, 1, 16, 10), data).plans())


def test_everything_fits_every_policy_fetches_each_row_once():
    data = _trace(1, 30, 12, 3, 50, 1.4)
    distinct = len(np.unique(np.concatenate([d + 1000 * np.arange(3) for d in data])))
    for policy in ("bagpipe", "lru", "lfu", "lru-prefetch", "bagpipe-original"):
        cfg = PlannerConfig(policy, distinct, 2, 30, 1, 12, 30)
        planner = Planner(cfg, data)
        if policy == "bagpipe-original":
            cfg = PlannerConfig(policy, distinct, 2, 30, 1, 12, 30)
        list(planner.plans())
        assert planner.stats[0].rows_fetched == distinct, policy


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), slack=st.sampled_from([0, 5, 30]), horizon=st.sampled_from([2, 8, 40]))
def test_bagpipe_never_beats_belady(seed, slack, horizon):
    """Without a scratch area, no plan fetches fewer rows than Belady's MIN."""
    data = _trace(seed, 40, 10, 3, 60, 1.5)
    capacity = _min_capacity(data, 1, 10) + slack
    planner = Planner(PlannerConfig("bagpipe", capacity, 1, horizon, 1, 10, len(data), bypass=False), data)
    list(planner.plans())
    assert planner.stats[0].rows_bypassed == 0
    assert planner.stats[0].rows_fetched >= belady_fetches(data, 10, 1, capacity, bypass=False)[0]


def _fewest_fetches(seq: list[set[int]], capacity: int) -> int:
    """The exact optimum with a scratch area, by search over every cache content after every iteration.

    A relaxation of the planners' rules, so a lower bound on any plan: here a row read through the
    scratch area may also stay, in place of one read in the same iteration. Only full caches are kept
    (as full as the rows seen allow): holding more rows never costs a fetch, since a row can leave at
    any later step for free.
    """
    import itertools

    costs = {frozenset(): 0}
    for rows in seq:
        after: dict[frozenset, int] = {}
        for held, cost in costs.items():
            cost += len(rows - held)
            pool = sorted(held | rows)
            for kept in itertools.combinations(pool, min(capacity, len(pool))):
                key = frozenset(kept)
                if after.get(key, cost + 1) > cost:
                    after[key] = cost
        costs = after
    return min(costs.values())


def test_bypass_fetches_less_and_never_below_the_exact_optimum():
    """On tiny traces, the scratch area saves fetches, and no plan fetches less than the true optimum with one:
    a plan below it would be counting wrong."""
    from bagpipe.keys import source_keys

    saved = reached = 0
    for seed in range(40):
        data = _trace(seed, 8, 2, 2, 12, 1.3)
        seq = [set(source_keys(data, i, 1).ravel().tolist()) for i in range(8)]
        capacity = max(len(s) for s in seq) + 1
        fetched = {}
        for bypass in (False, True):
            planner = Planner(PlannerConfig("bagpipe", capacity, 1, 8, 1, 2, 8, bypass=bypass), data)
            replay(planner.plans(), data, 1, 2, capacity)
            fetched[bypass] = planner.stats[0].rows_fetched
        best = _fewest_fetches(seq, capacity)
        assert best <= fetched[True] <= fetched[False], seed
        saved += fetched[True] < fetched[False]
        reached += fetched[True] == best
    assert saved >= 10 and reached >= 10, (saved, reached)


def test_a_broken_plan_is_caught():
    """The replay is a real check: a plan that skips a write-back is reported."""
    data = _trace(3, 20, 8, 2, 30, 1.3)
    capacity = _min_capacity(data, 1, 8)
    planner = Planner(PlannerConfig("lru", capacity, 0, 0, 1, 8, 20), data)

    def drop_writebacks():
        for i, plans in planner.plans():
            yield i, [dataclasses.replace(p, evict_write=np.zeros_like(p.evict_write)) for p in plans]

    with pytest.raises(ReplayError):
        replay(drop_writebacks(), data, 1, 8, capacity)


def test_planner_memory_follows_the_window_not_the_table():
    """Rows from tables of a billion rows plan with the same state as small tables."""
    small = _trace(4, 60, 8, 2, 50, 1.3)
    huge = [d * 19_999_999 for d in small]  # same pattern, ids spread over 1e9 rows
    sizes = []
    for data in (small, huge):
        planner = Planner(PlannerConfig("bagpipe", 40, 2, 6, 1, 8, 60), data)
        peak_rows = peak_bytes = 0
        for _ in planner.plans():
            peak_rows = max(peak_rows, planner.state_rows())
            peak_bytes = max(peak_bytes, planner.state_nbytes())
        sizes.append((peak_rows, peak_bytes))
    assert sizes[0] == sizes[1]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), trainers=st.sampled_from([1, 2, 3]), lead=st.integers(1, 4),
       slack=st.sampled_from([0, 4, 40]))
def test_fetches_are_staged_lead_ahead_and_never_before_a_writeback(seed, trainers, lead, slack):
    """Each fetch goes out as early as the lead allows, but never before its row's last write-back."""
    batch = 5 * trainers
    data = _trace(seed, 30, batch, 3, 40, 1.4)
    capacity = _min_capacity(data, trainers, batch) + slack
    planner = Planner(PlannerConfig("bagpipe", capacity, lead, lead + 3, trainers, batch, len(data)), data)
    plans = list(planner.plans())
    issued = [dict() for _ in range(trainers)]  # fetch id -> (iteration issued, key)
    written: dict[int, list[int]] = {}  # key -> iterations after which it was written back
    on_time = late = 0
    for i, ps in plans:
        for t, p in enumerate(ps):
            for n, key in enumerate(p.fetch_keys.tolist()):
                issued[t][p.first_fetch_id + n] = (i, key)
            for fid in p.install_ids.tolist():
                m, key = issued[t].pop(fid)
                assert i - lead <= m <= i, (fid, m, i)
                assert not any(m <= e < i for e in written.get(key, [])), (key, m, i, written[key])
                if m == max(i - lead, 0):
                    on_time += 1
                else:  # held back: a write-back of the row came after the lead's start
                    assert any(max(i - lead, 0) <= e + 1 == m for e in written.get(key, [])), (key, m, i)
                    late += 1
        for p in ps:
            for key in p.evict_keys[p.evict_write.astype(bool)].tolist():
                written.setdefault(key, []).append(i)
    assert all(not left for left in issued)
    assert late == sum(s.fetches_deferred for s in planner.stats)
    assert on_time > late


def test_staging_derives_new_plans_and_numbers_a_segment_from_its_offset():
    """Plans are frozen: staging leaves the on-demand plans as they were and builds the plans handed out,
    numbered from the segment's first iteration (versions of write-backs moved with it, -1 kept)."""
    data = _trace(5, 24, 8, 3, 40, 1.4)
    capacity = _min_capacity(data, 2, 8) + 4
    cfg = PlannerConfig("bagpipe", capacity, 2, 6, 2, 8, len(data))
    on_demand = list(Planner(cfg, data).on_demand_plans())
    before = [[{name: getattr(p, name).copy() for name, _ in Plan.ARRAYS} for p in ps] for _, ps in on_demand]
    with pytest.raises(dataclasses.FrozenInstanceError):
        on_demand[0][1][0].fetch_keys = np.zeros(0, np.int64)
    plain = list(stage_fetches(on_demand, 2, [PlanStats() for _ in range(2)]))
    shifted = list(stage_fetches(on_demand, 2, [PlanStats() for _ in range(2)], offset=100))
    for (i, ps), saved in zip(on_demand, before):
        for p, arrays in zip(ps, saved):
            assert p.iteration == i
            assert all(np.array_equal(getattr(p, name), arrays[name]) for name in arrays)
    waited = 0
    for (i, ps), (j, qs) in zip(plain, shifted):
        assert j == i + 100 and [q.iteration for q in qs] == [j, j]
        for p, q in zip(ps, qs):
            assert np.array_equal(q.fetch_versions, np.where(p.fetch_versions >= 0, p.fetch_versions + 100, -1))
            waited += int(np.count_nonzero(p.fetch_versions >= 0))
            assert all(np.array_equal(getattr(p, name), getattr(q, name)) for name, _ in Plan.ARRAYS
                       if name != "fetch_versions")
    assert waited > 0  # some fetch names a write-back, so the shift was exercised
