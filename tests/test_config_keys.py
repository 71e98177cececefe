"""Config validation names the key; initial row values are pure functions of (seed, key)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bagpipe.config import ConfigError, RunConfig
from bagpipe.keys import initial_rows, key_row, key_table, make_keys


@pytest.mark.parametrize("override, key", [
    ("trainers=0", "trainers"), ("batch_size=1001", "batch_size"), ("policy=fifo", "policy"),
    ("lead=4", "horizon"), ("optimizer=adam", "optimizer"), ("cache_rows=0", "cache_rows"),
    ("redis_persistence=maybe", "redis_persistence"), ("lr=-1", "lr"), ("oracle_bypass=maybe", "oracle_bypass"),
])
def test_bad_values_name_the_key(override, key):
    extra = ["horizon=2"] if override.startswith("lead") else []
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.load(None, [override] + extra)


def test_unknown_key_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'cache_size'"):
        RunConfig.load(None, ["cache_size=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text("policy = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.load(tmp_path / "missing.toml")


def test_overrides_and_relative_data_path(tmp_path):
    f = tmp_path / "job.toml"
    f.write_text('data = "prepared"\npolicy = "lru"\nbottom_mlp = [32, 16]\n')
    cfg = RunConfig.load(f, ["cache_rows=77", "shuffle=false"])
    assert cfg.policy == "lru" and cfg.cache_rows == 77 and cfg.shuffle is False
    assert cfg.data == str(tmp_path / "prepared") and cfg.bottom_mlp == (32, 16)


def test_keys_pack_and_unpack():
    keys = make_keys(np.array([0, 3, 25]), np.array([0, 12345, (1 << 40) - 1]))
    assert key_table(keys).tolist() == [0, 3, 25]
    assert key_row(keys).tolist() == [0, 12345, (1 << 40) - 1]


def test_initial_rows_are_deterministic_bounded_and_distinct():
    keys = make_keys(np.array([0] * 500 + [1] * 500), np.arange(1000))
    sizes = np.array([100, 10_000])
    a = initial_rows(keys, 16, 1, seed=7, table_sizes=sizes)
    assert np.array_equal(a, initial_rows(keys, 16, 1, seed=7, table_sizes=sizes))
    assert not np.array_equal(a, initial_rows(keys, 16, 1, seed=8, table_sizes=sizes))
    assert np.all(a[:, 16] == 0)  # optimizer state starts at zero
    assert np.abs(a[:500, :16]).max() <= 0.1 and np.abs(a[500:, :16]).max() <= 0.01
    assert len(np.unique(a[:, 0])) > 990
    # the same bits in another process
    code = ("import numpy as np, sys; from bagpipe.keys import initial_rows, make_keys;"
            "k = make_keys(np.array([0]*500+[1]*500), np.arange(1000));"
            "sys.stdout.buffer.write(initial_rows(k, 16, 1, 7, np.array([100, 10000])).tobytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    assert out == a.tobytes()


@pytest.mark.parametrize("checkpoint_every,eval_every", [(0, 0), (4, 0), (0, 3), (4, 6), (5, 5)])
def test_checkpoints_and_evaluations_fall_on_segment_ends(checkpoint_every, eval_every):
    """Caches are flushed only at segment ends, so every checkpoint and evaluation must be one."""
    cfg = RunConfig(checkpoint_every=checkpoint_every, eval_every=eval_every)
    iterations = 23
    flushes = [i for i in range(iterations) if cfg.flushes_after(i, iterations)]
    due = [i for i in range(iterations)
           if cfg.checkpoints_after(i, iterations) or cfg.evaluates_after(i, iterations)]
    assert set(due) <= set(flushes)
    assert flushes[-1] == iterations - 1
    if checkpoint_every:
        assert [i for i in range(iterations) if cfg.checkpoints_after(i, iterations)] == \
            [i for i in range(iterations) if (i + 1) % checkpoint_every == 0] + [iterations - 1]
    # Segments end nowhere else: each flush is a checkpoint, an evaluation, or the last iteration.
    assert set(flushes) <= set(due) | {iterations - 1}
