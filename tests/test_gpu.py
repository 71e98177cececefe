"""The CUDA path: the slot cache on the GPU, staged rows through a side stream, jobs on CUDA.

Tests marked ``gpu`` are skipped, saying why, where CUDA is not available;
``scripts/gpu-check.sh`` runs them on a GPU machine (docs/gpu.md). The
unmarked ones run everywhere: the same code on the CPU, and what a machine
without CUDA must say.

Exactness is bitwise where the arithmetic is the same: the same rows in
other slots (the difference between ``local`` and a cache), one trainer of
``bagpipe`` against ``local``, a resumed run against an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bagpipe.config import CacheConfig, ModelConfig, RunConfig
from bagpipe.dataset import Batch
from bagpipe.runner.export import load_model
from bagpipe.runner.job import run_job
from bagpipe.wire import Plan
from procs import wait_gone
from trainers.cache import RowInstaller, SlotCache, slots_kjt, to_device
from trainers.embeddings import Embeddings
from trainers.models import build_dense_model
from trainers.step import SoloCommunicator, Step
from trainers.trainer import TrainerError, pick_device

# cuBLAS's reproducible mode, as the trainer sets it (read when its first handle is made).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
HAS_CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")]
REPO = Path(__file__).resolve().parents[1]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=gpu)]
# About 0.1-0.8 s of a spinning kernel (by the SM clock): long beside a copy of a few kB.
SPIN = 1 << 28


def _gpu(fn):
    for mark in reversed(gpu):
        fn = mark(fn)
    return fn


@pytest.fixture
def deterministic():
    """The trainer's setting (trainers.trainer.main) for the test, then as it was."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# --------------------------------------------------------------- the slot cache
def _train_in_layout(device: str, model_name: str, placement: np.ndarray, steps: int = 3):
    """Three steps of ``Step`` over rows placed in slots ``placement[row]``; returns the rows
    (by row id, embedding and state) and the dense parameters, on the CPU."""
    rng = np.random.default_rng(7)
    n, dim, tables, b = len(placement), 16, 4, 256
    dev = torch.device(device)
    cfg = CacheConfig(cache_rows=n, optimizer="adagrad", lr=0.05)
    emb = Embeddings()
    emb.cache = SlotCache(n, dim, cfg.state_width, dev, cfg.optimizer, cfg.lr, cfg.eps)
    init = rng.standard_normal((n, dim + cfg.state_width)).astype(np.float32)
    init[:, dim:] = 0
    emb.cache.write(torch.from_numpy(placement.astype(np.int64)).to(dev), torch.from_numpy(init).to(dev))
    torch.manual_seed(0)
    model = build_dense_model(ModelConfig(name=model_name, embedding_dim=dim, bottom_mlp=(32, dim),
                                          top_mlp=(32, 16, 1)), 13, tables).to(dev)
    opt = torch.optim.Adagrad(list(model.parameters()), lr=0.05)
    step = Step(model, opt, SoloCommunicator(), [f"t{t}" for t in range(tables)], b, dev)
    for i in range(steps):
        rows = rng.integers(0, n // 4, (b, tables)) * 4 + np.arange(tables)  # duplicates within a batch
        plan = Plan.of(i, 0, read_slots=placement[rows].astype(np.int32))
        batch = Batch(dense=rng.standard_normal((b, 13)).astype(np.float32),
                      labels=(rng.random(b) < 0.3).astype(np.float32), sparse=rows, iteration=i)
        step(i, plan, emb, batch)
    by_row = emb.cache.read(torch.from_numpy(placement.astype(np.int64)).to(dev)).cpu()
    return by_row, [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_name", ["dlrm", "dcn"])
def test_the_same_rows_in_other_slots_train_the_same_bits(device, model_name, deterministic):
    """What ``local`` against a cache comes down to: slot numbers change, the arithmetic must not."""
    n = 800
    ref_rows, ref_dense = _train_in_layout(device, model_name, np.arange(n))
    perm = np.random.default_rng(1).permutation(n)
    rows, dense = _train_in_layout(device, model_name, perm)
    assert torch.equal(rows, ref_rows)
    assert all(torch.equal(a, b) for a, b in zip(dense, ref_dense))
    assert not torch.equal(ref_rows[:, -1], torch.zeros(n))  # the optimizer stepped rows (state grew)


@_gpu
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_slot_cache_on_cuda_looks_up_steps_installs_and_evicts(optimizer, deterministic):
    """Installs, lookups and evictions move the bits unchanged; the optimizer does the CPU's step.

    The CPU's step is the reference within 1e-6 relative: the row-wise mean of
    Adagrad reduces in another order on the GPU (SGD's elementwise step is exact).
    """
    rng = np.random.default_rng(3)
    dim, width = 8, 9
    caches = {d: SlotCache(0, dim, 1, torch.device(d), optimizer, 0.1, 1e-8, limit=600) for d in ("cpu", "cuda")}
    installer = RowInstaller(torch.device("cuda"))
    assert installer.stream is not None
    slots = rng.permutation(600)[:500].astype(np.int32)
    rows = rng.standard_normal((500, width)).astype(np.float32)
    rows[:, dim] = np.abs(rows[:, dim])
    for d, cache in caches.items():
        cache.ensure_slots(300)
        cache.ensure_slots(600)  # grows, keeping what it holds
        (RowInstaller(torch.device("cpu")) if d == "cpu" else installer)(cache, slots, rows)
    cuda = caches["cuda"]
    assert cuda.rows.shape == (600, width) and cuda.rows.is_cuda
    evicted = cuda.read(torch.from_numpy(slots.astype(np.int64)).cuda()).cpu().numpy()
    assert np.array_equal(evicted, rows)
    with pytest.raises(ValueError, match="cache_rows"):
        cuda.ensure_slots(601)
    read = rng.choice(slots, (64, 3)).astype(np.int64)
    before = cuda.rows.cpu()
    out = {}
    for d, cache in caches.items():
        kt, leaf, uniq = cache.lookup(slots_kjt(["a", "b", "c"], torch.from_numpy(read).to(d)))
        (kt.values() * torch.arange(1, 3 * dim + 1, dtype=torch.float32, device=d)).sum().backward()
        cache.apply_gradients(uniq, leaf.grad)
        out[d] = (kt.values().detach().cpu(), leaf.grad.cpu(), uniq.cpu(), cache.rows.cpu())
    assert torch.equal(out["cuda"][0], out["cpu"][0])  # the lookup: a gather
    assert torch.equal(out["cuda"][2], out["cpu"][2])
    assert torch.equal(out["cuda"][1], out["cpu"][1])  # integer-valued sums: exact in any order
    if optimizer == "sgd":
        assert torch.equal(out["cuda"][3], out["cpu"][3])
    else:
        torch.testing.assert_close(out["cuda"][3], out["cpu"][3], rtol=1e-6, atol=1e-7)
    assert not torch.equal(out["cuda"][3], before)  # the step changed rows


# ----------------------------------------------------- staged rows, a side stream
class _NoOrder(RowInstaller):
    """The planted bug: the compute stream does not wait for the copy."""

    def _order(self, compute, copied) -> None:
        pass


class _NoKeep(RowInstaller):
    """The planted bug: the buffers go back to the side stream's pool while still to be read."""

    def _keep(self, compute, *tensors) -> None:
        pass


def _late_install(kind: type[RowInstaller], seed: int, n: int = 4096, width: int = 33):
    """Install rows while the side stream is still busy (a long kernel queued on it first), then read
    them back on the compute stream at once; returns (rows, what the read saw, whether the host had
    waited for the copy). Each call's rows are its own (``seed``), so stale memory cannot match."""
    dev = torch.device("cuda")
    cache = SlotCache(n, width - 1, 1, dev, "sgd", 0.1, 1e-8)
    installer = kind(dev)
    rows = np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32) + 10 * seed
    slots = np.random.default_rng(6).permutation(n).astype(np.int32)
    with torch.cuda.stream(installer.stream):
        torch.cuda._sleep(SPIN)
    installer(cache, slots, rows)
    seen = cache.read(torch.from_numpy(slots.astype(np.int64)).to(dev))
    host_waited = installer.stream.query()  # True only if install had waited for the copy
    seen = seen.cpu().numpy()
    torch.cuda.synchronize()
    return rows, seen, host_waited


@_gpu
def test_staged_rows_are_copied_on_a_side_stream_and_the_lookup_waits_for_them():
    rows, seen, host_waited = _late_install(RowInstaller, seed=1)
    assert np.array_equal(seen, rows)
    assert not host_waited  # the host queued the copy and went on; the GPU ordered the read after it
    # The same with the wait taken out reads the slots before the rows arrive: the test can fail.
    rows, seen, _ = _late_install(_NoOrder, seed=2)
    assert not np.array_equal(seen, rows)


def _installs_behind_a_busy_compute_stream(kind: type[RowInstaller]):
    """Two installs of the same size while the compute stream is busy: the first's device buffers
    must still hold its rows when the compute stream gets to them."""
    dev = torch.device("cuda")
    n, width = 4096, 17
    cache = SlotCache(2 * n, width - 1, 1, dev, "sgd", 0.1, 1e-8)
    installer = kind(dev)
    rng = np.random.default_rng(8)
    first, second = (rng.standard_normal((n, width)).astype(np.float32) for _ in range(2))
    torch.cuda._sleep(SPIN)  # on the compute stream: the index_copy_ of both installs waits behind it
    installer(cache, np.arange(n, dtype=np.int32), first)
    installer(cache, np.arange(n, 2 * n, dtype=np.int32), second)
    torch.cuda.synchronize()
    got = cache.rows.cpu().numpy()
    return (first, second), (got[:n], got[n:])


@_gpu
def test_a_side_stream_buffer_is_not_reused_before_the_compute_stream_reads_it():
    (first, second), (got1, got2) = _installs_behind_a_busy_compute_stream(RowInstaller)
    assert np.array_equal(got1, first) and np.array_equal(got2, second)
    (first, _), (got1, _) = _installs_behind_a_busy_compute_stream(_NoKeep)
    if np.array_equal(got1, first):
        pytest.skip("the allocator did not reuse the first buffer here; the hazard record_stream "
                    "prevents was not shown (the correct installer passed above)")


@_gpu
def test_to_device_does_not_make_the_host_wait_for_the_gpu():
    a = np.arange(1 << 16, dtype=np.int64)
    to_device(a, torch.device("cuda"))  # the first pinned block: allocating it may wait for the device
    torch.cuda.synchronize()
    torch.cuda._sleep(SPIN)
    t = to_device(a, torch.device("cuda"))
    busy_after = not torch.cuda.current_stream().query()
    assert busy_after  # the host went on while the kernel before the copy still ran
    assert np.array_equal(t.cpu().numpy(), a)  # and the copy landed, in stream order
    # A plain .to() from pageable memory waits for the stream: the reason for to_device.
    torch.cuda._sleep(SPIN)
    torch.from_numpy(a).to("cuda")
    assert torch.cuda.current_stream().query()


def test_on_the_cpu_the_installer_and_to_device_are_plain_tensors():
    cache = SlotCache(10, 2, 1, torch.device("cpu"), "sgd", 0.1, 1e-8)
    installer = RowInstaller(torch.device("cpu"))
    assert installer.stream is None
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    installer(cache, np.array([7, 1, 3, 0], np.int32), rows)
    assert np.array_equal(cache.rows[[7, 1, 3, 0]].numpy(), rows)
    a = np.arange(5)
    t = to_device(a, torch.device("cpu"))
    a[0] = 99
    assert t[0] == 99  # the array itself, as torch.from_numpy: nothing copied on the CPU


# ------------------------------------------------------- local: every row on the device
@pytest.mark.parametrize("device", DEVICES)
def test_local_rows_touched_on_the_device_checkpoint_and_restore(device, deterministic):
    """``local`` marks the rows each step updates on the device; a checkpoint's rows are exactly those,
    and restoring them into fresh embeddings gives the same rows and the same marks."""
    from bagpipe.keys import ROW_BITS
    from trainers.embeddings import LocalEmbeddings

    dev = torch.device(device)
    sizes = np.array([300, 50, 1000], np.int64)
    cfg = CacheConfig(cache_rows=10, optimizer="adagrad", lr=0.05)
    rng = np.random.default_rng(4)
    sparse = [np.stack([rng.integers(0, n, 64) for n in sizes], axis=1) for _ in range(3)]
    emb = LocalEmbeddings(sizes, cfg, 8, 0, dev, sparse, 0, 1)
    assert emb.touched.device.type == dev.type
    torch.manual_seed(0)
    model = build_dense_model(ModelConfig(embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(16, 1)), 13, 3).to(dev)
    step = Step(model, torch.optim.Adagrad(list(model.parameters()), lr=0.05), SoloCommunicator(),
                ["a", "b", "c"], 64, dev)
    for i in range(3):
        batch = Batch(dense=rng.standard_normal((64, 13)).astype(np.float32),
                      labels=(rng.random(64) < 0.5).astype(np.float32), sparse=sparse[i], iteration=i)
        step(i, emb.next_plan(i), emb, batch)
    chunks = list(emb.touched_rows())
    keys = np.concatenate([k for k, _ in chunks])
    values = np.concatenate([v for _, v in chunks])
    used = np.unique(np.concatenate([(np.arange(3, dtype=np.int64) << ROW_BITS) | s for s in sparse]))
    assert np.array_equal(np.sort(keys), used)
    assert np.array_equal(values, emb.rows_for(keys))
    fresh = LocalEmbeddings(sizes, cfg, 8, 0, dev, sparse, 0, 1)
    fresh.restore(iter(chunks))
    assert torch.equal(fresh.cache.rows, emb.cache.rows) and torch.equal(fresh.touched, emb.touched)


# ------------------------------------------------------------- devices per rank
def test_without_cuda_device_cuda_is_a_clear_error_and_auto_is_the_cpu():
    if HAS_CUDA:
        pytest.skip("CUDA is available here")
    with pytest.raises(TrainerError, match="config key 'device': cuda requested but CUDA is not available"):
        pick_device("cuda", {})
    assert pick_device("auto", {}) == torch.device("cpu")
    assert pick_device("cpu", {}) == torch.device("cpu")


@_gpu
def test_each_rank_gets_its_own_gpu_or_the_cpu():
    gpus = torch.cuda.device_count()
    assert pick_device("auto", {}) == torch.device("cuda", 0)
    assert pick_device("cuda", {"LOCAL_RANK": str(gpus - 1), "LOCAL_WORLD_SIZE": str(gpus)}) == \
        torch.device("cuda", gpus - 1)
    crowded = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(gpus + 1)}
    assert pick_device("auto", crowded) == torch.device("cpu")  # nccl cannot put two ranks on one GPU
    with pytest.raises(TrainerError, match=rf"cuda for {gpus + 1} trainers on this node, but {gpus} GPU"):
        pick_device("cuda", crowded)


# ----------------------------------------------------------------- jobs on CUDA
SETTINGS = dict(trainers=1, shards=2, batch_size=128, iterations=24, checkpoint_every=8, cache_rows=2500, lead=2,
                horizon=4, eval_batches=1, device="cuda")


@pytest.fixture(scope="module")
def local_on_cuda(small_criteo, tmp_path_factory):
    if not HAS_CUDA:
        pytest.skip("CUDA is not available")
    run_dir = tmp_path_factory.mktemp("local-cuda")
    run_job(RunConfig(data=str(small_criteo), policy="local", **SETTINGS), run_dir, quiet=True)
    return run_dir


def _assert_same_model(ref_dir: Path, got_dir: Path) -> None:
    ref, got = load_model(ref_dir), load_model(got_dir)
    assert ref["dense"].keys() == got["dense"].keys()
    for name, tensor in ref["dense"].items():
        assert got["dense"][name].equal(tensor), name
    for table, rows in ref["tables"].items():
        for part in ("ids", "weights", "state"):
            assert got["tables"][table][part].equal(rows[part]), (table, part)


@_gpu
@pytest.mark.slow
def test_bagpipe_on_cuda_trains_the_local_model_bit_for_bit(local_on_cuda, small_criteo, tmp_path):
    m = run_job(RunConfig(data=str(small_criteo), policy="bagpipe", **SETTINGS), tmp_path / "bagpipe", quiet=True)
    assert m["rows_fetched"] > 0 and m["rows_written_back"] > 0
    # It ran on the GPU: rank 0 saved the dense state as it held it.
    saved = torch.load(local_on_cuda / "model.pt", weights_only=True)
    assert all(t.is_cuda for t in saved["dense"].values())
    _assert_same_model(local_on_cuda, tmp_path / "bagpipe")


@_gpu
@pytest.mark.slow
def test_bagpipe_killed_on_cuda_then_resumed_reaches_the_same_model(local_on_cuda, small_criteo, tmp_path):
    """The checkpoint's dense state is loaded onto the GPU; the RNG state must go back to the CPU.
    (The store's latency makes the run long enough to be killed between checkpoints.)"""
    run_dir = tmp_path / "run"
    sets = dict(SETTINGS, policy="bagpipe", data=str(small_criteo), store_latency_us=3000)
    cmd = [sys.executable, "-m", "bagpipe", "run", "--run-dir", str(run_dir)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v) if isinstance(v, str) else v}"]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "LATEST").exists():
            assert job.poll() is None, job.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.05)
        pids = json.loads((run_dir / "pids.json").read_text())
        os.kill(int((run_dir / "rank0.pid").read_text()), signal.SIGKILL)
        job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode != 0
    assert wait_gone(list(pids.values()), 20.0) == []
    resumed = subprocess.run([sys.executable, "-m", "bagpipe", "run", "--run-dir", str(run_dir), "--resume"],
                             cwd=REPO, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert "resuming from the checkpoint after iteration" in resumed.stdout + resumed.stderr
    _assert_same_model(local_on_cuda, run_dir)
