"""Multi-hot (pooled) features end to end: data, keys, plans, lookup, and jobs bit for bit against ``local``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bagpipe.dataset import PAD, Dataset, DatasetError
from bagpipe.keys import batch_keys, distinct_rows_per_trainer, plan_keys, trainer_keys
from bagpipe.policies import PLANNED
from bagpipe.runner.check import compare_models, verdict
from bagpipe.runner.export import load_model
from data.multihot import MLPERF_BAGS, MultiHotError, main as multihot_main, parse_bags
from oracle import planner as fast
from oracle import reference as ref
from oracle.replay import replay
from trainers.cache import BagLayout, SlotCache, slots_kjt
from test_planner_fast import _assert_same

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bags_data(small_criteo, tmp_path_factory) -> Path:
    """small_criteo with bags of 0-3 ids per table (empty bags and, in small tables, repeated ids)."""
    out = tmp_path_factory.mktemp("multihot") / "bags"
    assert multihot_main(["--input", str(small_criteo), "--out", str(out), "--bags", "3", "--lengths", "uniform",
                          "--seed", "5"]) == 0
    return out


def test_materialized_bags_keep_each_id_with_its_fixed_companions(small_criteo, tmp_path):
    out = tmp_path / "fixed"
    assert multihot_main(["--input", str(small_criteo), "--out", str(out), "--bags", "4"]) == 0
    src, mh = Dataset(small_criteo), Dataset(out)
    assert mh.bags == [4] * 26 and mh.multi_hot and not src.multi_hot
    assert list(mh.column_tables[:8]) == [0, 0, 0, 0, 1, 1, 1, 1]
    one = src.batches(512, shuffle=False)[0].sparse
    many = mh.batches(512, shuffle=False)[0].sparse
    assert many.shape == (512, 104) and (many >= 0).all()
    # Column 0 of each bag is the one-hot id; the companions are a function of (table, id) alone.
    assert np.array_equal(many[:, ::4], one)
    for t in range(26):
        bags = many[:, 4 * t:4 * t + 4]
        for row_id in np.unique(one[:, t])[:20]:
            same = bags[one[:, t] == row_id]
            assert (same == same[0]).all(), (t, row_id)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["created_by"] == "bagpipe data multi-hot" and meta["tables"][0]["bag"] == 4
    column = pq.ParquetFile(next((out / "train").glob("*.parquet"))).schema_arrow.field(src.sparse_names[0])
    assert column.type.equals(pa.list_(pa.int64()))


def test_uniform_lengths_give_empty_and_full_bags_padded_after_the_ids(bags_data):
    ds = Dataset(bags_data)
    sparse = ds.sparse_batches(1024, shuffle=False)[0]
    bags = sparse.reshape(1024, 26, 3)
    lengths = (bags >= 0).sum(axis=2)
    assert set(np.unique(lengths)) == {0, 1, 2, 3}
    # Pads only after a bag's ids: a present id never follows a pad.
    assert not ((bags[:, :, 1:] >= 0) & (bags[:, :, :-1] < 0)).any()
    assert (sparse[sparse < 0] == PAD).all()
    # The reader's matrix is the list column, bag for bag.
    table = pq.read_table(sorted((bags_data / "train").glob("*.parquet"))[0], columns=["cat_4"]).column("cat_4").to_pylist()
    unshuffled = ds.batches(len(table) if len(table) < 1024 else 1024, shuffle=False)[0].sparse
    for r in range(50):
        assert [v for v in unshuffled[r, 12:15] if v >= 0] == table[r]


def test_bag_arguments_and_inputs_are_checked(small_criteo, bags_data, tmp_path):
    assert parse_bags("mlperf", 26) == MLPERF_BAGS and sum(MLPERF_BAGS) == 214
    with pytest.raises(MultiHotError, match="3 sizes for 26 tables"):
        parse_bags("1,2,3", 26)
    with pytest.raises(MultiHotError, match="for 26 tables; the input has 3"):
        parse_bags("mlperf", 3)
    r = subprocess.run([sys.executable, "-m", "bagpipe", "data", "multi-hot", "--input", str(bags_data), "--out",
                        str(tmp_path / "x"), "--bags", "2"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "already multi-hot" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "bagpipe", "data", "multi-hot", "--input", str(small_criteo), "--out",
                        str(small_criteo), "--bags", "2"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "holds the input" in r.stderr


def test_a_bag_longer_than_meta_allows_is_named(bags_data, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bags_data, bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["tables"][4]["bag"] = 2
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"column cat_4: row \d+ of the group has a bag of 3 ids; .* at most 2"):
        Dataset(bad).sparse_batches(256, shuffle=False)[0]


def test_plan_keys_stand_pads_in_for_a_key_of_the_same_share():
    rows = np.array([[5, -1, 7, -1], [5, 6, -1, -1], [-1, -1, 9, 1], [3, -1, -1, -1]])
    tables = np.array([0, 0, 1, 1])
    keys = batch_keys(rows, tables)
    assert (keys[rows < 0] == -1).all()
    planned = plan_keys(rows, tables, trainers=2)
    assert (planned >= 0).all() and np.array_equal(planned[rows >= 0], keys[rows >= 0])
    for t in range(2):
        share, real = trainer_keys(planned, t, 2), trainer_keys(keys, t, 2)
        assert set(share.ravel()) == set(real[real >= 0].ravel())
    assert distinct_rows_per_trainer(rows, 2, tables).tolist() == [3, 3]
    with pytest.raises(ValueError, match="trainer 1's share of a batch has no ids"):
        plan_keys(np.array([[1, 2], [-1, -1]]), np.array([0, 1]), trainers=2)


def _bag_trace(seed: int, iterations: int, batch: int, bags: list[int], rows: int) -> "Bags":
    rng = np.random.default_rng(seed)
    width = sum(bags)
    out = []
    for _ in range(iterations):
        ids = (rng.zipf(1.3, size=(batch, width)) - 1) % rows
        lengths = rng.integers(0, np.array(bags) + 1, size=(batch, len(bags)))
        place = np.concatenate([np.arange(b) for b in bags])[None, :]
        ids[place >= np.repeat(lengths, bags, axis=1)] = PAD
        out.append(ids)
    return Bags(out, np.repeat(np.arange(len(bags)), bags))


class Bags(list):
    """A multi-hot batch source, as bagpipe.dataset's: batches plus the table of each column."""

    def __init__(self, batches, column_tables):
        super().__init__(batches)
        self.column_tables = column_tables


@pytest.mark.parametrize("policy", PLANNED)
@pytest.mark.parametrize("trainers", [1, 2])
def test_fast_planner_matches_the_reference_on_bags(policy, trainers):
    data = _bag_trace(7, 30, 64, [3, 1, 5, 2], 300)
    need = ref.Planner(ref.PlannerConfig("lru", 1 << 30, 0, 0, trainers, 64, len(data)), data).min_cache_rows()
    cfg = ref.PlannerConfig(policy, need + 30, 2, 6, trainers, 64, len(data))
    _assert_same(cfg, data)
    # Every read (pads' stand-ins included) finds its row in the slot the plan names.
    replay(fast.Planner(cfg, data).plans(), data, trainers, 64, cfg.cache_rows if cfg.rules.bounded else None)


def test_bag_layout_orders_values_as_a_kjt_and_pools_mean_exactly():
    layout = BagLayout(["a", "b"], [2, 3], ["sum", "mean"])
    ids = np.array([[4, -1, 1, 2, 3], [-1, -1, 5, -1, -1]])
    slots = torch.tensor([[10, 99, 11, 12, 13], [98, 97, 14, 96, 95]])
    kjt = layout.kjt(slots, ids)
    assert kjt.values().tolist() == [10, 11, 12, 13, 14] and kjt.lengths().tolist() == [1, 0, 3, 1]
    cache = SlotCache(16, 2, 0, torch.device("cpu"), "sgd", 0.1, 1e-8)
    cache.rows[:] = torch.arange(32, dtype=torch.float32).view(16, 2)
    kt, _, _ = layout.lookup(cache, slots, ids)
    out = kt.values()
    assert torch.equal(out[0], torch.cat([cache.rows[10], (cache.rows[11] + cache.rows[12] + cache.rows[13]) / 3]))
    assert torch.equal(out[1], torch.cat([torch.zeros(2), cache.rows[14]]))
    one = BagLayout(["a", "b"], [1, 1], ["mean", "mean"])
    s = torch.tensor([[1, 2], [3, 4]])
    assert torch.equal(one.kjt(s, np.ones((2, 2), np.int64)).values(), slots_kjt(["a", "b"], s).values())


def _run(run_dir: Path, data: Path, **settings) -> subprocess.CompletedProcess:
    sets = [f"{k}={v}" for k, v in {"data": data, "iterations": 24, "batch_size": 256, "eval_batches": 2,
                                    **settings}.items()]
    return subprocess.run([sys.executable, "-m", "bagpipe", "run", "--run-dir", str(run_dir), "--set", *sets],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_one_trainer_on_bags_equals_local_bit_for_bit(bags_data, tmp_path):
    """Sum and mean pooling, empty bags and repeated ids, a cache smaller than the rows read."""
    runs = {}
    for policy in ("local", "bagpipe"):
        r = _run(tmp_path / policy, bags_data, policy=policy, trainers=1, cache_rows=9000,
                 pooling=",".join(["sum", "mean"] * 13))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[policy] = load_model(tmp_path / policy)
    cmp = compare_models(runs["local"], runs["bagpipe"])
    assert verdict(cmp, runs["local"], runs["bagpipe"]), (cmp.max_abs, cmp.problems)
    metrics = json.loads((tmp_path / "bagpipe" / "metrics.json").read_text())
    assert metrics["rows_fetched"] > 0 and metrics["rows_written_back"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["bagpipe", "lru"])
def test_two_trainers_on_bags_equal_local_with_two_bit_for_bit(bags_data, tmp_path, policy):
    r = _run(tmp_path / "local", bags_data, policy="local", trainers=2, pooling="mean")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(tmp_path / policy, bags_data, policy=policy, trainers=2, cache_rows=6000, pooling="mean")
    assert r.returncode == 0, r.stderr[-3000:]
    ref, got = load_model(tmp_path / "local"), load_model(tmp_path / policy)
    cmp = compare_models(ref, got)
    assert verdict(cmp, ref, got), (cmp.max_abs, cmp.problems)


def test_pooling_of_the_wrong_length_is_named(bags_data, tmp_path):
    r = _run(tmp_path / "run", bags_data, policy="local", trainers=1, pooling="sum,mean")
    assert r.returncode != 0
    assert "config key 'pooling': 2 entries for the data's 26 tables" in r.stderr and "Traceback" not in r.stderr
