"""Nothing lost: kill any process after a checkpoint, resume, and get the model of a run that never stopped."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from bagpipe.runner.check import compare_models, identical
from bagpipe.checkpoint import CheckpointError, Checkpoints, load_manifest
from bagpipe.config import RunConfig
from bagpipe.runner.export import load_model
from bagpipe.runner.job import run_job
from bagpipe.rundir import RunDir
from procs import finish, set_args, start_job, wait_for_checkpoint, wait_gone

pytestmark = pytest.mark.slow
SETTINGS = {"batch_size": 128, "iterations": 24, "checkpoint_every": 8, "cache_rows": 2500, "lead": 2,
            "horizon": 4, "eval_batches": 1, "redis_persistence": "appendonly", "redis_appendfsync": "always"}




@pytest.fixture(scope="module")
def reference(small_criteo, tmp_path_factory):
    """The uninterrupted runs, one and two trainers."""
    out = {}
    for trainers in (1, 2):
        cfg = RunConfig.load(None, [f"data={small_criteo}", f"trainers={trainers}"] +
                             [s for s in set_args(SETTINGS) if s != "--set"])
        rd = tmp_path_factory.mktemp(f"uninterrupted{trainers}")
        run_job(cfg, rd, quiet=True)
        out[trainers] = load_model(rd)
    return out


def _victim_pid(run_dir: Path, victim: str) -> int:
    if victim.startswith("rank"):
        return int((run_dir / f"{victim}.pid").read_text())
    if victim.startswith("agent"):
        return RunDir(run_dir).agent_pid(int(victim[5:]))
    return json.loads((run_dir / "pids.json").read_text())[victim]


@pytest.mark.parametrize("trainers, victim, names", [
    (1, "rank0", "trainers"),
    (2, "rank1", "trainers"),
    (2, "oracle", "oracle"),
    (2, "agent1", "the store agent of rank 1"),
    (1, "redis1", "shard 1"),
    (2, "job", None),
])
def test_kill_then_resume_reaches_the_same_model(small_criteo, tmp_path, reference, trainers, victim, names):
    run_dir = tmp_path / "run"
    settings = dict(SETTINGS, trainers=trainers, store_latency_us=3000)
    job = start_job(run_dir, small_criteo, settings)
    wait_for_checkpoint(job, run_dir)
    pids = json.loads((run_dir / "pids.json").read_text())
    pids.update({f"agent{r}": RunDir(run_dir).agent_pid(r) for r in range(trainers)})
    pid = job.pid if victim == "job" else _victim_pid(run_dir, victim)
    os.kill(pid, signal.SIGKILL)
    rc, out = finish(job, timeout_s=90)
    assert rc != 0
    if names:
        assert names in out, out[-3000:]
    # Nothing is left behind, even when the job process itself was killed.
    left = wait_gone(list(pids.values()), 20.0)
    assert left == [], f"processes left behind: {left}"
    resumed = start_job(run_dir, small_criteo, {}, resume=True)
    rc, out = finish(resumed)
    assert rc == 0, out[-3000:]
    assert "resuming from the checkpoint after iteration" in out
    got = load_model(run_dir)
    cmp = compare_models(reference[trainers], got)
    # Bit for bit with the uninterrupted run of the same trainer count (same reduction order).
    assert identical(reference[trainers], got), (cmp.max_abs, cmp.problems)


def test_checkpoint_from_another_job_is_refused(small_criteo, tmp_path):
    cfg = RunConfig.load(None, [f"data={small_criteo}", "trainers=1"] + [s for s in set_args(SETTINGS) if s != "--set"])
    run_job(cfg.replace(iterations=8), tmp_path / "run", quiet=True)
    latest = Checkpoints(tmp_path / "run").latest()
    assert latest is not None and latest.name == "iter-000000007"
    manifest = json.loads((latest / "manifest.json").read_text())
    with pytest.raises(CheckpointError, match="config key 'lr'"):
        load_manifest(latest, dict(manifest["fingerprint"], lr=0.5))
    # A damaged file is named.
    rows = sorted(latest.glob("rows-*.parquet"))[0]
    rows.write_bytes(rows.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"{rows.name} is missing or damaged"):
        load_manifest(latest, manifest["fingerprint"])
