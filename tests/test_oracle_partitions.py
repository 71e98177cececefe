"""Partitioned planning (oracle.partitions): K planners over disjoint rows, merged into one plan.

With K = 1 the merged plans are the plain planner's, array for array; with
more, they run correctly on the toy trainer (oracle.replay), the compiled and
the reference planners merge to the same plans, every row stays in its
partition's share of the slots, fetch counts stay within 1.02x of K = 1, and
a share too small for a batch is named with the cache_rows that works.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bagpipe.config import ConfigError, RunConfig, partition_shares, smallest_partitioned_cache
from bagpipe.keys import distinct_rows_per_partition, partition_of, source_keys, trainer_keys
from bagpipe.policies import PLANNED
from bagpipe.wire import Plan
from oracle import planner as fast
from oracle import reference as ref
from oracle.partitions import PartitionedPlanner, make_planner
from oracle.replay import replay

PAD = -1


def _trace(seed: int, iterations: int, batch: int, tables: int, rows: int, skew: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [((rng.zipf(skew, size=(batch, tables)) - 1) * 7919) % rows for _ in range(iterations)]


class Bags(list):
    """A multi-hot batch source, as bagpipe.dataset's: batches plus the table of each column."""

    def __init__(self, batches, column_tables):
        super().__init__(batches)
        self.column_tables = column_tables


def _bag_trace(seed: int, iterations: int, batch: int, bags: list[int], rows: int) -> Bags:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(iterations):
        ids = (rng.zipf(1.3, size=(batch, sum(bags))) - 1) % rows
        lengths = rng.integers(0, np.array(bags) + 1, size=(batch, len(bags)))
        place = np.concatenate([np.arange(b) for b in bags])[None, :]
        ids[place >= np.repeat(lengths, bags, axis=1)] = PAD
        ids[:, 0] = np.abs(ids[:, 0])  # every sample reads at least one id
        out.append(ids)
    return Bags(out, np.repeat(np.arange(len(bags)), bags))


def _run(planner, ack_lag: int | None = None):
    out = []
    for i, plans in planner.plans():
        out.append((i, plans))
        if ack_lag is not None:
            planner.note_writebacks_applied(i - ack_lag)
    return out


def _assert_same_plans(want, got) -> None:
    assert len(got) == len(want)
    for (i, plans_w), (j, plans_g) in zip(want, got):
        assert i == j and len(plans_w) == len(plans_g)
        for t, (w, g) in enumerate(zip(plans_w, plans_g)):
            assert (g.iteration, g.rank) == (w.iteration, w.rank)
            for name, _ in Plan.ARRAYS:
                a, b = getattr(w, name), getattr(g, name)
                assert b.dtype == a.dtype and b.shape == a.shape, (i, t, name)
                assert np.array_equal(a, b), (i, t, name, a, b)
            for name in Plan.SCALARS:
                assert getattr(g, name) == getattr(w, name), (i, t, name)


def _min_partitioned(data, trainers: int, k: int) -> int:
    tables = getattr(data, "column_tables", None)
    most = np.zeros(k, np.int64)
    for rows in data:
        most = np.maximum(most, distinct_rows_per_partition(rows, trainers, k, tables).max(axis=0))
    return smallest_partitioned_cache(most.tolist())


def _capacity(policy: str, data, trainers: int, batch: int, k: int) -> int:
    cap = _min_partitioned(data, trainers, k) + 5 * k
    return cap + 3 * batch if policy == "static" else cap  # room for pinned rows beside one batch


# ------------------------------------------------------------------ (a) one partition is the planner
@pytest.mark.parametrize("policy", PLANNED)
@pytest.mark.parametrize("trainers", [1, 2])
def test_one_partition_plans_what_the_planner_plans(policy, trainers):
    batch = 8 * trainers
    data = _trace(3, 30, batch, 4, 300, 1.3)
    cfg = fast.PlannerConfig(policy, _capacity(policy, data, trainers, batch, 1), 2, 5, trainers, batch, len(data))
    plain = fast.Planner(cfg, data)
    # The partitions step one iteration ahead of the merge, so an acknowledgement reaches them one step
    # later than it reaches the plain planner (PartitionedPlanner._lockstep): lag 1 there is lag 2 here.
    want = _run(plain, ack_lag=2)
    split = PartitionedPlanner(cfg, data)
    _assert_same_plans(want, _run(split, ack_lag=1))
    assert [vars(s) for s in split.stats] == [vars(s) for s in plain.stats]
    assert type(make_planner(cfg, data)) is fast.Planner  # a job with one partition runs the plain planner


def test_one_partition_on_bags_plans_what_the_planner_plans():
    data = _bag_trace(5, 20, 32, [3, 1, 4], 200)
    cfg = fast.PlannerConfig("bagpipe", _capacity("bagpipe", data, 2, 32, 1), 2, "auto", 2, 32, len(data))
    _assert_same_plans(_run(fast.Planner(cfg, data)), _run(PartitionedPlanner(cfg, data)))


# ------------------------------------------------------------------ (b) K partitions plan correctly
def _assert_in_shares(plans, data, cfg) -> None:
    """Every read of a row of partition p names a slot of p's share (bounded) or of p's residue (unbounded);
    a row in the scratch area (bounded, past cache_rows) reads a scratch slot of its partition's residue."""
    k, shares = cfg.partitions, partition_shares(cfg.cache_rows, cfg.partitions)
    bases = np.concatenate([[0], np.cumsum(shares)])
    for i, per_trainer in plans:
        keys = source_keys(data, i, cfg.trainers)
        for t, plan in enumerate(per_trainer):
            owner = partition_of(trainer_keys(keys, t, cfg.trainers), k)
            slots = plan.read_slots.astype(np.int64)
            if cfg.rules.bounded:
                cached = slots < cfg.cache_rows
                assert (slots[cached] >= bases[owner[cached]]).all(), (i, t)
                assert (slots[cached] < bases[owner[cached] + 1]).all(), (i, t)
                assert ((slots[~cached] - cfg.cache_rows) % k == owner[~cached]).all(), (i, t)
                assert cfg.bypasses or cached.all()
            else:
                assert (slots % k == owner).all(), (i, t)
            assert slots.max() < plan.slots_needed


@pytest.mark.parametrize("policy", PLANNED)
@pytest.mark.parametrize("k", [2, 4])
def test_partitions_merge_into_plans_that_train_the_one_table_model(policy, k):
    trainers, batch = 2, 24
    data = _trace(11, 30, batch, 4, 400, 1.3)
    cfg = fast.PlannerConfig(policy, _capacity(policy, data, trainers, batch, k), 2, 5, trainers, batch, len(data),
                             partitions=k)
    plans = _run(PartitionedPlanner(cfg, data), ack_lag=2)
    # The toy trainer: every fetch finds its version, every read its row, capacity held, the result that
    # of one table holding every row.
    replay(iter(plans), data, trainers, batch, cfg.cache_rows if cfg.rules.bounded else None)
    _assert_in_shares(plans, data, cfg)
    # The differential test, extended to partitions: the reference planner merges to the same plans.
    _assert_same_plans(_run(PartitionedPlanner(cfg, data, backend=ref), ack_lag=2), plans)


@pytest.mark.parametrize("k", [2, 3])
def test_partitions_on_bags_read_every_row_where_the_plan_says(k):
    data = _bag_trace(9, 25, 48, [3, 1, 5, 2], 300)
    cfg = fast.PlannerConfig("bagpipe", _capacity("bagpipe", data, 2, 48, k), 2, "auto", 2, 48, len(data),
                             partitions=k)
    plans = _run(PartitionedPlanner(cfg, data))
    replay(iter(plans), data, 2, 48, cfg.cache_rows)
    _assert_in_shares(plans, data, cfg)


def test_threads_do_not_change_the_plans():
    data = _trace(2, 25, 32, 6, 2000, 1.2)
    cfg = fast.PlannerConfig("bagpipe", _capacity("bagpipe", data, 2, 32, 4), 2, 6, 2, 32, len(data), partitions=4)
    _assert_same_plans(_run(PartitionedPlanner(cfg, data, workers=0)), _run(PartitionedPlanner(cfg, data, workers=4)))


# ------------------------------------------------------------------ (c) fetches
def test_partitions_fetch_within_two_percent_of_one_planner():
    trainers, batch = 2, 256
    data = _trace(0, 60, batch, 8, 20_000, 1.15)
    cache = 2 * _min_partitioned(data, trainers, 8)
    fetched = {}
    for k in (1, 2, 4, 8):
        planner = make_planner(fast.PlannerConfig("bagpipe", cache, 2, "auto", trainers, batch, len(data),
                                                  partitions=k), data)
        _run(planner)
        fetched[k] = sum(s.rows_fetched for s in planner.stats)
    for k in (2, 4, 8):
        assert fetched[k] <= 1.02 * fetched[1], fetched


# ------------------------------------------------------------------ (d) a share too small
def test_a_share_too_small_names_the_smallest_workable_cache():
    trainers, batch, k = 1, 64, 4
    data = _trace(4, 12, batch, 3, 5000, 1.2)
    smallest = _min_partitioned(data, trainers, k)
    plain = fast.Planner(fast.PlannerConfig("lru", 1 << 30, 0, 0, trainers, batch, len(data)), data).min_cache_rows()
    assert smallest > plain  # the trace's batches fit the whole cache, not every share of it
    cfg = fast.PlannerConfig("bagpipe", smallest - 1, 2, 4, trainers, batch, len(data), partitions=k)
    with pytest.raises(fast.PlanError, match=rf"'cache_rows': {smallest - 1} is too small for oracle_partitions = "
                                             rf"{k}: .* the smallest workable cache_rows is {smallest} with {k}"):
        _run(PartitionedPlanner(cfg, data))
    _run(PartitionedPlanner(fast.PlannerConfig("bagpipe", smallest, 2, 4, trainers, batch, len(data),
                                               partitions=k), data))


def test_smallest_partitioned_cache_is_the_least_whose_shares_hold_every_partition():
    for most in ([3, 3, 3], [3, 2, 2], [2, 3, 2], [2, 2, 3], [0, 0], [1], [5, 0, 5, 1]):
        def fits(c):
            return all(s >= m for s, m in zip(partition_shares(c, len(most)), most))
        c = smallest_partitioned_cache(most)
        assert fits(c) and (c == len(most) or not fits(c - 1)), (most, c)


def test_the_job_refuses_a_share_too_small_before_anything_starts(small_criteo, tmp_path):
    from bagpipe.runner.job import run_job

    cfg = RunConfig(data=str(small_criteo), policy="bagpipe", trainers=1, batch_size=192, iterations=5,
                    cache_rows=5000, oracle_partitions=1000)
    with pytest.raises(ConfigError, match=r"too small for oracle_partitions = 1000: .* smallest workable "
                                          r"cache_rows is at least \d+ with 1000 partitions"):
        run_job(cfg, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "pids.json").exists()


def test_oracle_partitions_is_checked():
    assert RunConfig.load(None, ["oracle_partitions=4"]).oracle_config().partitions == 4
    for bad in ("oracle_partitions=0", "oracle_partitions=-2"):
        with pytest.raises(ConfigError, match="oracle_partitions"):
            RunConfig.load(None, [bad])
    with pytest.raises(ConfigError, match="oracle_partitions"):
        RunConfig.load(None, ["cache_rows=3", "oracle_partitions=4"])


# ------------------------------------------------------------------ a whole job
def _assert_models_equal(a, b) -> None:
    for name, tensor in a["dense"].items():
        assert b["dense"][name].equal(tensor), name
    for table, rows in a["tables"].items():
        for field in ("ids", "weights", "state"):
            assert b["tables"][table][field].equal(rows[field]), (table, field)


@pytest.mark.slow
@pytest.mark.parametrize("trainers", [1, 2])
def test_a_partitioned_job_trains_the_local_model(small_criteo, tmp_path, trainers):
    """``bagpipe run`` with two partitions: the exported model is bitwise that of policy ``local``."""
    from bagpipe.runner.export import load_model
    from bagpipe.runner.job import run_job

    base = RunConfig(data=str(small_criteo), trainers=trainers, shards=1, batch_size=128 * trainers,
                     iterations=12, cache_rows=2500, lead=2, horizon=4, eval_batches=2)
    run_job(base.replace(policy="local"), tmp_path / "local", quiet=True)
    m = run_job(base.replace(policy="bagpipe", oracle_partitions=2), tmp_path / "split", quiet=True)
    assert m["rows_fetched"] > 0 and m["rows_written_back"] > 0
    stats = json.loads((tmp_path / "split" / "oracle_stats.json").read_text())
    assert [s["oracle_partitions"] for s in stats] == [2] * trainers
    _assert_models_equal(load_model(tmp_path / "local"), load_model(tmp_path / "split"))


def test_the_kernels_split_keys_as_partition_of_does():
    from oracle.partitions import _owners

    keys = np.random.default_rng(0).integers(0, 1 << 62, size=(64, 5))
    for k in (1, 2, 3, 8, 200):
        assert np.array_equal(_owners(keys, k).astype(np.int64), partition_of(keys, k)), k


def test_simulate_reports_the_partitioned_planner():
    from oracle.simulate import simulate

    data = _trace(6, 20, 64, 4, 3000, 1.2)
    cache = 2 * _min_partitioned(data, 2, 4)
    report = simulate(data, 64, cache, 2, 2, 6, len(data), ["bagpipe"], partitions=4)["bagpipe"]
    planner = PartitionedPlanner(fast.PlannerConfig("bagpipe", cache, 2, 6, 2, 64, len(data), partitions=4), data)
    _run(planner)
    assert report["rows_fetched"] == sum(s.rows_fetched for s in planner.stats)
    assert report["rows_written_back"] == sum(s.rows_written_back for s in planner.stats)
