"""Nothing destroyed, nothing read wrong (issue 20, findings 6-12 and 14), through real processes.

Each test names the finding it holds to. Fast ones drive ``prepare`` and the
dataset reader in-process (or a job that is refused before it starts any
process); the ``slow`` ones run whole jobs: redis-server shards, the oracle,
torchrun trainers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bagpipe.checkpoint import Checkpoints, load_manifest
from bagpipe.config import ConfigError, RunConfig
from bagpipe.dataset import Dataset, DatasetError
from bagpipe.keys import initial_rows, make_keys
from bagpipe.rundir import RunDir, RunDirError
from bagpipe.runner.check import compare_models, identical
from bagpipe.runner.export import load_model
from bagpipe.runner.job import run_job
from data.prepare import PrepareConfig, PrepareError, prepare
from data.synth import SynthConfig, synthesise
from procs import wait_gone

REPO = Path(__file__).resolve().parents[1]
JOB = ["--set", "trainers=2", "--set", "batch_size=256", "--set", "cache_rows=3000", "--set", "eval_batches=2"]


def _bagpipe(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``bagpipe ARGS`` as a user runs it; the whole run bounded by ``timeout``."""
    return subprocess.run([sys.executable, "-m", "bagpipe", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _job_error(out: str) -> str:
    """The job's error, from its first line on (``[job]``'s ERROR line and what follows it)."""
    at = out.find(" ERROR [job] ")
    assert at >= 0, out[-3000:]
    return out[at + len(" ERROR [job] "):]


def _flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x04
    path.write_bytes(bytes(data))


def _inside_pages(path: Path, group: int, column: str) -> int:
    """A byte offset inside the values of one column chunk's last page (not its page header, whose
    statistics no read depends on)."""
    md = pq.ParquetFile(path).metadata.row_group(group)
    col = next(md.column(j) for j in range(md.num_columns) if md.column(j).path_in_schema == column)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    return start + col.total_compressed_size - 5


def _port_pair() -> int:
    """A free loopback port P with P + 1 free too (torchrun's and the rendezvous store's)."""
    import socket

    for _ in range(100):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


def _copy(dataset: Path, dst: Path) -> Path:
    shutil.copytree(dataset, dst)
    return dst


def _file(dataset: Path, split: str = "train", k: int = 0) -> Path:
    return dataset / json.loads((dataset / "meta.json").read_text())["files"][split][k]


def _read_everything(dataset: Path) -> list[np.ndarray]:
    """Every split through the readers trainers and the oracle use."""
    ds = Dataset(dataset)
    out = []
    for split in ("train", "eval"):
        r = ds.batches(100, shuffle=False, split=split)
        out += [np.concatenate([r[i].sparse, r[i].dense, r[i].labels[:, None]], axis=1) for i in range(len(r))]
    s = ds.sparse_batches(100)
    return out + [s[i] for i in range(len(s))]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("raw")
    synthesise(SynthConfig("criteo", 3000, d, seed=5, files=2))
    return d


@pytest.fixture(scope="module")
def tiny(raw, tmp_path_factory) -> Path:
    """3,000 rows: train in row groups of 1,000, eval the last 20%."""
    out = tmp_path_factory.mktemp("tiny") / "prepared"
    prepare(PrepareConfig("criteo", tuple(sorted(raw.iterdir())), out, hash_buckets=2000, eval_fraction=0.2,
                          rows_per_group=1000))
    return out


# ------------------------------------------------ 6. prepare destroys nothing


def test_prepare_into_its_inputs_directory_is_refused_and_the_inputs_stay(raw, tmp_path):
    inputs = _copy(raw, tmp_path / "raw")
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    r = _bagpipe("data", "prepare", "--format", "criteo", "--input", *map(str, sorted(inputs.iterdir())),
                 "--out", str(inputs), "--replace", timeout=60)
    assert r.returncode == 1, r.stderr
    assert f"--out {inputs}: holds the input {inputs}/day_0" in r.stderr and "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before
    # Nor a directory above the inputs.
    with pytest.raises(PrepareError, match="holds the input"):
        prepare(PrepareConfig("criteo", (inputs / "day_0",), tmp_path, eval_fraction=0.0, replace=True))
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before


def test_prepare_replaces_only_a_dataset_it_made_and_only_when_told(raw, tmp_path):
    inputs = tuple(sorted(raw.iterdir()))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(PrepareError, match="not empty .* not a dataset made by `bagpipe data prepare`"):
        prepare(PrepareConfig("criteo", inputs, other, eval_fraction=0.0))
    assert (other / "keep.txt").read_text() == "mine" and sorted(p.name for p in other.iterdir()) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare(PrepareConfig("criteo", inputs, empty, eval_fraction=0.0))  # an empty directory is fine
    first = (empty / "meta.json").read_text()
    with pytest.raises(PrepareError, match="already holds a prepared dataset; pass --replace"):
        prepare(PrepareConfig("criteo", inputs, empty, eval_fraction=0.0, hash_buckets=500))
    assert (empty / "meta.json").read_text() == first
    meta = prepare(PrepareConfig("criteo", inputs, empty, eval_fraction=0.0, hash_buckets=500, replace=True)).meta
    assert json.loads((empty / "meta.json").read_text()) == meta and meta["params"]["hash_buckets"] == 500
    # A dataset directory that someone put a file into is not replaced: the file would go with it.
    (empty / "train" / "README").write_text("notes")
    with pytest.raises(PrepareError, match="README, which `bagpipe data prepare` did not write"):
        prepare(PrepareConfig("criteo", inputs, empty, eval_fraction=0.0, replace=True))
    assert (empty / "train" / "README").read_text() == "notes"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(PrepareError, match="exists and is not a directory"):
        prepare(PrepareConfig("criteo", inputs, tmp_path / "a-file", eval_fraction=0.0, replace=True))


# ------------------------------------------------ 8. a flipped byte is never read


def test_prepare_writes_page_checksums(tiny):
    assert json.loads((tiny / "meta.json").read_text())["page_checksums"] is True
    assert Dataset(tiny).page_checksums


def test_a_flipped_byte_in_any_columns_pages_is_named(tiny, tmp_path):
    """Each of the 40 columns: one byte flipped inside its pages; the read names file, row group, column."""
    names = Dataset(tiny).schema.names
    assert len(names) == 40
    for column in names:
        ds = _copy(tiny, tmp_path / column)
        path = _file(ds, "train", 0)
        _flip(path, _inside_pages(path, 1, column))
        # In file order with one row group a window, batch 1 is row group 1.
        reader = Dataset(ds).batches(1000, shuffle=False, shuffle_window_rows=1000)
        reader[0]
        with pytest.raises(DatasetError, match=re.escape(f"{path}: row group 1, column {column}: damaged")):
            reader[1]
        if column.startswith("cat_"):  # the oracle's view reads the id columns only
            with pytest.raises(DatasetError, match=f"column {column}: damaged"):
                Dataset(ds).sparse_batches(1000, shuffle=False, shuffle_window_rows=1000)[1]
        shutil.rmtree(ds)


def test_every_sampled_byte_flip_is_caught_or_harmless(tiny, tmp_path):
    """Flip bytes all over a file (pages, page headers, footer): each read either raises
    DatasetError or returns exactly the original data."""
    ds = _copy(tiny, tmp_path / "ds")
    path = _file(ds, "train", 0)
    original = path.read_bytes()
    want = _read_everything(ds)
    footer = len(original) - 8 - int.from_bytes(original[-8:-4], "little")
    rng = np.random.default_rng(11)
    positions = np.concatenate([rng.choice(footer, 300, replace=False),
                                footer + rng.choice(len(original) - footer, 100, replace=False)])
    caught = 0
    for pos in positions.tolist():
        _flip(path, pos)
        try:
            got = _read_everything(ds)
        except DatasetError as exc:
            assert str(path) in str(exc)
            caught += 1
        else:
            assert all(np.array_equal(a, b) for a, b in zip(got, want)), f"byte {pos} flipped was read silently"
        path.write_bytes(original)
    assert caught > 300  # most bytes matter; the rest (statistics, padding) change nothing read


def test_a_dataset_without_page_checksums_is_held_to_its_content_hash(tiny, tmp_path):
    ds = _copy(tiny, tmp_path / "old")
    meta = json.loads((ds / "meta.json").read_text())
    del meta["page_checksums"]  # as an earlier version wrote it
    (ds / "meta.json").write_text(json.dumps(meta))
    Dataset(ds).verify_content_hash()
    _flip(_file(ds, "eval", 0), 100)
    with pytest.raises(DatasetError, match="do not match meta.json's content_hash"):
        Dataset(ds).verify_content_hash()
    cfg = RunConfig(data=str(ds), policy="local", trainers=1, batch_size=100, iterations=4, eval_batches=1)
    with pytest.raises(ConfigError, match="config key 'data': .* content_hash"):
        run_job(cfg, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "pids.json").exists()  # refused before anything started


# ------------------------------------------------ 9. ids outside meta.json's tables


def test_ids_outside_the_tables_meta_json_gives_are_named(tiny, tmp_path):
    ds = _copy(tiny, tmp_path / "ds")
    meta = json.loads((ds / "meta.json").read_text())
    meta["tables"][3]["num_embeddings"] = 5
    (ds / "meta.json").write_text(json.dumps(meta))
    pattern = r"row group \d+, column cat_3: id \d+ \(row \d+ of the group\) is outside the table's 5 rows"
    with pytest.raises(DatasetError, match=pattern):
        Dataset(ds).batches(100, split="train")[0]
    with pytest.raises(DatasetError, match=pattern):
        Dataset(ds).sparse_batches(100)[0]
    with pytest.raises(DatasetError, match=pattern):
        Dataset(ds).batches(100, split="eval")[0]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["bagpipe", "local"])
def test_a_job_on_tables_smaller_than_the_data_stops_naming_the_column(small_criteo, tmp_path, policy):
    ds = _copy(small_criteo, tmp_path / "ds")
    meta = json.loads((ds / "meta.json").read_text())
    meta["tables"][3]["num_embeddings"] = 100
    (ds / "meta.json").write_text(json.dumps(meta))
    r = _bagpipe("run", "--run-dir", str(tmp_path / "run"), "--set", f"data={ds}", "--set", f"policy={policy}",
                 "--set", "iterations=8", *JOB)
    assert r.returncode == 1
    assert re.search(r"column cat_3: id \d+ .* outside the table's 100 rows", _job_error(r.stderr)), r.stderr[-3000:]
    assert not (tmp_path / "run" / "model.pt").exists()


# ------------------------------------------------ 8, job level: the trainers' reads are checked too


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["bagpipe", "local"])
def test_a_damaged_dense_page_stops_the_job_naming_it(small_criteo, tmp_path, policy):
    """A dense column is read by the trainers only (the start-up check reads ids): they stop and say where."""
    ds = _copy(small_criteo, tmp_path / "ds")
    path = _file(ds, "train", 0)
    _flip(path, _inside_pages(path, 0, "dense_5"))
    r = _bagpipe("run", "--run-dir", str(tmp_path / "run"), "--set", f"data={ds}", "--set", f"policy={policy}",
                 "--set", "iterations=8", *JOB)
    assert r.returncode == 1
    first = _job_error(r.stderr).splitlines()[0]
    assert re.search(rf"rank \d failed: {path}: row group 0, column dense_5: damaged", first), r.stderr[-3000:]
    assert not (tmp_path / "run" / "model.pt").exists()


# ------------------------------------------------ 10. the eval split is checked at start


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_eval_file_is_refused_before_training(small_criteo, tmp_path, damage):
    ds = _copy(small_criteo, tmp_path / "ds")
    path = _file(ds, "eval", 0)
    if damage == "flip":
        _flip(path, _inside_pages(path, 0, "label"))
    else:
        path.write_bytes(path.read_bytes()[:-100])
    r = _bagpipe("run", "--run-dir", str(tmp_path / "run"), "--set", f"data={ds}", "--set", "iterations=8", *JOB,
                 timeout=60)
    assert r.returncode == 1
    assert _job_error(r.stderr).startswith(f"config key 'data': {path}"), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "pids.json").exists()  # no process was started, no training lost


# ------------------------------------------------ 11. numbers finite and in range; resume refused


@pytest.mark.parametrize("override, key", [
    ("lr=inf", "lr"), ("lr=nan", "lr"), ("dense_lr=inf", "dense_lr"), ("eps=nan", "eps"),
    ("seed=-1", "seed"), ("plan_timeout_s=inf", "plan_timeout_s"), ("redis_timeout_s=nan", "redis_timeout_s"),
    ("store_latency_us=inf", "store_latency_us"), ("store_bandwidth_gbps=nan", "store_bandwidth_gbps"),
    ("cache_rows=2147483648", "cache_rows"), ("iterations=1e30", "iterations"),
])
def test_numbers_out_of_range_or_not_finite_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.load(None, [override])


def test_lr_inf_is_refused_by_the_command_in_one_line(tmp_path):
    r = _bagpipe("run", "--run-dir", str(tmp_path / "run"), "--set", "lr=inf", timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().endswith("config key 'lr': must be a finite number > 0, got inf"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_largest_seed_works_everywhere(tiny):
    seed = (1 << 63) - 1
    cfg = RunConfig(seed=seed)
    assert cfg.store_config().seed == seed
    rows = initial_rows(make_keys(np.array([0, 1]), np.array([3, 4])), 4, 1, seed, np.array([10, 10]))
    assert np.all(np.abs(rows[:, :4]) <= np.sqrt(1 / 10)) and np.all(rows[:, 4] == 0)
    assert Dataset(tiny).batches(100, seed=seed)[0].sparse.shape == (100, 26)


def _finished_short_run(data: Path, tmp_path: Path) -> Path:
    """A run of 8 iterations, checkpoints after 3 and 7, finished."""
    run = tmp_path / "run"
    r = _bagpipe("run", "--run-dir", str(run), "--set", f"data={data}", "--set", "iterations=8",
                 "--set", "checkpoint_every=4", *JOB)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.mark.slow
def test_a_resume_with_nothing_left_is_refused_and_touches_nothing(small_criteo, tmp_path):
    run = _finished_short_run(small_criteo, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "lock"}
    for extra, left in ((["--set", "iterations=5"], "5 iterations"), ([], "8 iterations")):
        r = _bagpipe("run", "--run-dir", str(run), "--resume", *extra, timeout=60)
        assert r.returncode == 1
        assert _job_error(r.stderr).startswith(f"--resume: the checkpoint iter-000000007 is after iteration 7 and "
                                               f"this run has {left}"), r.stderr
        assert "nothing is left to run; set iterations > 8" in r.stderr and "samples/s" not in r.stdout
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "lock"} == before


@pytest.mark.slow
def test_a_run_stopped_after_its_last_checkpoint_is_finished_by_a_resume(small_criteo, tmp_path):
    """A job killed after its final checkpoint, before its results: --resume trains nothing and writes them."""
    run = _finished_short_run(small_criteo, tmp_path)
    finished = load_model(run)
    auc = json.loads((run / "metrics.json").read_text())["eval_auc"]
    for name in ("metrics.json", "model.pt"):  # what a kill during the final evaluation leaves unwritten
        (run / name).unlink()
    r = _bagpipe("run", "--run-dir", str(run), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "finished from the checkpoint after iteration 7 (nothing was left to train)" in r.stdout, r.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["iterations_run"] == 0 and metrics["train_logloss"] is None and metrics["eval_auc"] == auc
    again = load_model(run)
    cmp = compare_models(finished, again)
    assert identical(finished, again), (cmp.max_abs, cmp.problems)


@pytest.mark.slow
def test_training_that_diverges_fails(small_criteo, tmp_path):
    r = _bagpipe("run", "--run-dir", str(tmp_path / "run"), "--set", f"data={small_criteo}", "--set", "policy=local",
                 "--set", "trainers=1", "--set", "iterations=8", "--set", "lr=1e30", "--set", "dense_lr=1e30",
                 "--set", "batch_size=256", "--set", "eval_batches=1")
    assert r.returncode == 1
    assert _job_error(r.stderr).startswith("training diverged: train logloss is nan"), r.stderr[-3000:]


# ------------------------------------------------ 7. one job per run directory


def test_the_lock_names_its_holder_and_goes_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bagpipe.rundir import RunDir; "
                               "lock = RunDir(sys.argv[1]).lock(); print('locked', flush=True); time.sleep(60)",
                               str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"{tmp_path} is in use by another job \(pid {holder.pid} on "):
            RunDir(tmp_path).lock()
        holder.send_signal(signal.SIGKILL)  # however the holder ends, the lock goes with it
        holder.wait(10)
        with RunDir(tmp_path).lock():
            with pytest.raises(RunDirError, match=f"pid {os.getpid()} "):
                RunDir(tmp_path).lock()
        RunDir(tmp_path).lock().release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


@pytest.mark.slow
def test_a_second_job_on_a_run_directory_in_use_is_refused(small_criteo, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "bagpipe", "run", "--run-dir", str(run), "--set",
                              f"data={small_criteo}", "--set", "iterations=40", "--set", "checkpoint_every=8",
                              "--set", "store_latency_us=1500", *JOB], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (run / "checkpoints" / "LATEST").exists():
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline, "the first job wrote no checkpoint"
            time.sleep(0.2)
        job_id, config = (run / "job_id").read_text(), (run / "config.json").read_text()
        second = _bagpipe("run", "--run-dir", str(run), "--set", f"data={small_criteo}", "--set", "iterations=12",
                          *JOB, timeout=60)
        assert second.returncode == 1
        assert re.search(rf"run directory {run} is in use by another job \(pid {first.pid} on .*\); wait for it",
                         second.stderr), second.stderr
        assert (run / "job_id").read_text() == job_id and (run / "config.json").read_text() == config
        assert (run / "checkpoints" / "LATEST").exists()
        out, _ = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode == 0, out[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["iterations"] == 40 and metrics["resumed_from"] is None
    latest = Checkpoints(run).latest()
    assert latest.name == "iter-000000039"
    load_manifest(latest, json.loads((latest / "manifest.json").read_text())["fingerprint"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["LATEST", "iter-000000031", "iter-000000039"]


# ------------------------------------------------ 12. persistence as documented


@pytest.mark.slow
def test_appendonly_files_are_written_but_a_resume_starts_from_the_checkpoint(small_criteo, tmp_path):
    """docs/checkpoints.md: with redis_persistence=appendonly each shard keeps an append-only file, but
    a resume flushes the store and loads the checkpoint's rows, never the newer rows of an AOF."""
    settings = ["--set", "redis_persistence=appendonly", "--set", "redis_appendfsync=always", "--set", "iterations=160",
                "--set", "checkpoint_every=8", "--set", "trainers=1", "--set", "batch_size=128", "--set",
                "cache_rows=2500", "--set", "eval_batches=1", "--set", f"data={small_criteo}"]
    ref = tmp_path / "uninterrupted"
    r = _bagpipe("run", "--run-dir", str(ref), *settings)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "bagpipe", "run", "--run-dir", str(run), *settings,
                            "--set", "store_latency_us=3000"], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (run / "checkpoints" / "LATEST").exists():
            assert job.poll() is None, job.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # Train on past the checkpoint, so that the AOFs hold newer rows than it; 160 iterations leave a
        # fast machine time to be caught mid-run.
        past = json.loads((Checkpoints(run).latest() / "manifest.json").read_text())["iteration"] + 3
        while (RunDir(run).progress() or {}).get("iteration", 0) <= past:
            assert job.poll() is None, "the job ended before the shard could be killed: " + job.stdout.read()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pids = json.loads((run / "pids.json").read_text())
        os.kill(pids["redis1"], signal.SIGKILL)
        job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode != 0
    assert wait_gone(list(pids.values()), 20.0) == []
    aof = [p for p in (run / "redis").rglob("*.aof*") if p.is_file() and p.stat().st_size > 0]
    assert aof, sorted(str(p) for p in (run / "redis").rglob("*"))
    latest = Checkpoints(run).latest()
    manifest = json.loads((latest / "manifest.json").read_text())
    rows = manifest["rows"]
    r = _bagpipe("run", "--run-dir", str(run), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    # After iteration 7, or 15 when the loaded machine trained on before the lost shard was seen.
    assert f"resuming from the checkpoint after iteration {manifest['iteration']}" in r.stderr
    assert f"loaded {rows} rows from the checkpoint into the store" in r.stderr
    cmp = compare_models(load_model(ref), load_model(run))
    assert identical(load_model(ref), load_model(run)), (cmp.max_abs, cmp.problems)


# ------------------------------------------------ 14. logs per launch; summaries lead with the cause


@pytest.mark.slow
def test_each_launch_logs_afresh_and_quotes_only_its_own_errors(small_criteo, tmp_path):
    run = tmp_path / "run"
    reasons = []
    for k, column in enumerate(("dense_5", "dense_9")):
        ds = tmp_path / f"ds{k}"
        if not ds.exists():
            _copy(small_criteo, ds)
        path = _file(ds, "train", 0)
        _flip(path, _inside_pages(path, 0, column))
        r = _bagpipe("run", "--run-dir", str(run), "--set", f"data={ds}", "--set", "iterations=8", *JOB)
        assert r.returncode == 1
        reasons.append(_job_error(r.stderr))
    assert "column dense_5" in reasons[0] and "column dense_9" not in reasons[0]
    assert "column dense_9" in reasons[1] and "column dense_5" not in reasons[1], reasons[1]
    assert "dense_9" in (run / "trainers.log").read_text() and "dense_5" not in (run / "trainers.log").read_text()
    assert "dense_5" in (run / "trainers.log.1").read_text()
    assert (run / "oracle.log.1").exists()


@pytest.mark.slow
def test_a_full_disk_names_the_file_leaves_no_temporary_and_leads_with_rank_0(small_criteo, tmp_path):
    """The checkpoint directory on a 400 KiB tmpfs: the dense state fits, the rows do not."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    checkpoints.mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(checkpoints)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        r = _bagpipe("run", "--run-dir", str(run), "--set", f"data={small_criteo}", "--set", "iterations=16",
                     "--set", "checkpoint_every=8", *JOB)
        left = sorted(p.name for p in checkpoints.iterdir())
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)
    assert r.returncode == 1
    first = _job_error(r.stderr).splitlines()[0]
    assert re.search(rf"\[trainer 0\] rank 0 failed: checkpoint after iteration 7: cannot write "
                     rf"{checkpoints}/\.tmp-iter-000000007/(rows-\d+\.parquet|dense\.pt): .*No space left on device",
                     first), r.stderr[-3000:]
    assert left == [], left  # no .tmp-iter-* left behind, no LATEST naming a partial checkpoint


@pytest.mark.slow
def test_node_0_quotes_the_cause_on_node_1_whole(small_criteo, tmp_path):
    """Two nodes on loopback; the oracle (node 0) corrupts a plan bound for rank 1 (node 1), whose
    trainer stops with a checksum error; node 0's trainers only lose their peer, so node 0 must lead
    with node 1's reason, quoted whole."""
    port = _port_pair()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
              "--join-timeout", "60"]
    # Several nodes need one job secret on every node (docs/security.md); one filesystem here.
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "bagpipe", "keys", "--out", str(keys)], check=True, cwd=REPO,
                   capture_output=True, timeout=60)
    common += ["--secret-file", str(keys / "job.secret")]
    env = dict(os.environ, BAGPIPE_FAULT="plan-corrupt:3:1")
    cmd = [sys.executable, "-m", "bagpipe", "run"]
    node0 = subprocess.Popen(cmd + ["--run-dir", str(tmp_path / "node0"), "--node-rank", "0", *common, "--set",
                                    f"data={small_criteo}", "--set", "iterations=12", *JOB], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    node1 = subprocess.Popen(cmd + ["--run-dir", str(tmp_path / "node1"), "--node-rank", "1", *common,
                                    "--shards-per-node", "0"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    outs = []
    try:
        for p in (node0, node1):
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in (node0, node1):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert node0.returncode == 1 and node1.returncode == 1, outs
    own = _job_error(outs[1]).splitlines()[0]
    assert own.startswith("trainers (pid ") and "[trainer 1] rank 1 failed: " in own, outs[1][-3000:]
    cause = own.split("rank 1 failed: ", 1)[1]
    assert len(cause) > 10
    first = _job_error(outs[0]).splitlines()[0]
    assert first.startswith("node 1 failed: trainers (pid ") and first.endswith(cause), outs[0][-3000:]
