"""The trainer's core, without a job: SlotCache, Step (in-process and over two gloo ranks), StoreIO
against a real redis-server, and OracleServer over real ZeroMQ sockets."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bagpipe.config import CacheConfig, ModelConfig, OracleConfig
from bagpipe.dataset import Batch
from bagpipe.keys import batch_keys, initial_rows, make_keys
from bagpipe.procs import free_port
from bagpipe.wire import Plan
from trainers.cache import SlotCache, slots_kjt
from trainers.embeddings import Embeddings, LocalEmbeddings
from trainers.models import build_dense_model
from trainers.step import Communicator, SkipSyncStep, SoloCommunicator, Step
from trainers.storeio import StoreIO, StoreIOError

CPU = torch.device("cpu")
TABLES = np.array([50, 30, 20], np.int64)
DIM = 4


# ---------------------------------------------------------------- SlotCache
def test_slot_cache_lookup_sums_gradients_of_repeated_rows_and_steps_adagrad():
    cache = SlotCache(5, 2, 1, CPU, "adagrad", lr=0.5, eps=1e-8)
    cache.write(torch.tensor([0, 1, 3]), torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0], [5.0, 6.0, 1.0]]))
    slots = torch.tensor([[0, 3], [0, 1], [3, 3]])  # [batch 3, tables 2]; slot 0 twice, slot 3 three times
    kt, leaf, uniq = cache.lookup(slots_kjt(["a", "b"], slots))
    assert uniq.tolist() == [0, 1, 3]
    assert torch.equal(kt.values()[1], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    kt.values().sum().backward()
    assert leaf.grad.tolist() == [[2.0, 2.0], [1.0, 1.0], [3.0, 3.0]]  # one gradient per distinct row, summed
    cache.apply_gradients(uniq, leaf.grad)
    # Row-wise Adagrad: state += mean(g^2); w -= lr g / (sqrt(state) + eps)
    state3 = 1.0 + 9.0
    assert torch.allclose(cache.read(torch.tensor([3]))[0],
                          torch.tensor([5 - 0.5 * 3 / (state3 ** 0.5 + 1e-8), 6 - 0.5 * 3 / (state3 ** 0.5 + 1e-8),
                                        state3]))
    assert cache.read(torch.tensor([2])).abs().sum() == 0  # untouched slot


def test_slot_cache_grows_for_plans_and_refuses_past_its_limit():
    cache = SlotCache(0, DIM, 1, CPU, "sgd", 0.1, 1e-8, limit=10)
    cache.ensure_slots(3)
    cache.write(torch.tensor([2]), torch.ones(1, DIM + 1))
    cache.ensure_slots(7)
    assert cache.rows.shape[0] == 7 and torch.equal(cache.read(torch.tensor([2])), torch.ones(1, DIM + 1))
    cache.ensure_slots(9)
    assert cache.rows.shape[0] == 10  # doubling stops at the limit
    with pytest.raises(ValueError, match="needs 11 cache slots; this cache holds at most 10"):
        cache.ensure_slots(11)


# ---------------------------------------------------------------- Step
def _batches(seed: int, n: int, batch: int) -> list[Batch]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sparse = np.stack([rng.zipf(1.3, batch) % s for s in TABLES], axis=1).astype(np.int64)
        out.append(Batch(rng.standard_normal((batch, 3)).astype(np.float32),
                         (rng.random(batch) < 0.3).astype(np.float32), sparse, i))
    return out


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_dense_model(ModelConfig(embedding_dim=DIM, bottom_mlp=(8, DIM), top_mlp=(8, 1)), 3, len(TABLES))


def _local(batches: list[Batch], rank: int, world: int) -> LocalEmbeddings:
    sparse = [b.sparse for b in batches]
    return LocalEmbeddings(TABLES, CacheConfig(cache_rows=1, optimizer="adagrad", lr=0.1), DIM, 7, CPU,
                           sparse, rank, world)


def _train(step_cls, comm: Communicator, batches: list[Batch], rank: int = 0, world: int = 1):
    model = _model()
    opt = torch.optim.Adagrad(list(model.parameters()), lr=0.05)
    emb = _local(batches, rank, world)
    step = step_cls(model, opt, comm, ["t0", "t1", "t2"], len(batches[0].labels), CPU)
    local = len(batches[0].labels) // world
    losses = []
    for i, b in enumerate(batches):
        mine = Batch(b.dense[rank * local:(rank + 1) * local], b.labels[rank * local:(rank + 1) * local],
                     b.sparse[rank * local:(rank + 1) * local], i)
        result = step(i, emb.next_plan(i), emb, mine)
        losses.append(result.loss)
        assert set(result.times) >= {"install", "forward", "backward", "combine", "optimizer", "evict"}
    return model, emb, losses


def test_step_trains_and_is_deterministic_in_process():
    batches = _batches(1, 6, 16)
    m1, e1, l1 = _train(Step, SoloCommunicator(), batches)
    m2, e2, l2 = _train(Step, SoloCommunicator(), batches)
    assert l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert torch.equal(e1.cache.rows, e2.cache.rows)
    # Only rows the batches read were updated, and they moved away from their initial values.
    keys = np.unique(np.concatenate([batch_keys(b.sparse).ravel() for b in batches]))
    assert int(e1.touched.sum()) == len(keys)
    assert not np.array_equal(e1.rows_for(keys)[:, :DIM], initial_rows(keys, DIM, 1, 7, TABLES)[:, :DIM])


class _MirrorComm(Communicator):
    """A stand-in for one other rank that read exactly what this rank read: all-reduce doubles.

    With two identical ranks the summed gradients are twice one rank's, so every synced row and
    every dense parameter must step with the doubled gradient; the planted ``skip-sync`` bug
    (rows updated with their own gradients only) must differ."""

    rank, world = 0, 2

    def __init__(self) -> None:
        self.calls = 0

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self.calls += 1
        tensor.mul_(2)

    def barrier(self) -> None:
        pass


def test_step_combines_shared_rows_through_the_communicator():
    batches = _batches(2, 3, 8)
    # world=2 plans: every row anyone reads is synced; the fake rank reads the same rows.
    doubled = [Batch(np.concatenate([b.dense, b.dense]), np.concatenate([b.labels, b.labels]),
                     np.concatenate([b.sparse, b.sparse]), b.iteration) for b in batches]
    comm = _MirrorComm()
    _, emb, _ = _train(Step, comm, doubled, rank=0, world=2)
    assert comm.calls == len(batches)  # one all-reduce per iteration (no joins under local)
    _, emb_bug, _ = _train(SkipSyncStep, _MirrorComm(), doubled, rank=0, world=2)
    assert not torch.equal(emb.cache.rows, emb_bug.cache.rows)  # the mutant is visible
    _, again, _ = _train(Step, _MirrorComm(), doubled, rank=0, world=2)
    assert torch.equal(emb.cache.rows, again.cache.rows)
    # One process on the same global batches sums the same gradients in another order (16 terms in
    # batch order, against 2 x the first 8): equal up to rounding, not bit for bit.
    _, ref, _ = _train(Step, SoloCommunicator(), doubled)
    keys = np.unique(np.concatenate([batch_keys(b.sparse).ravel() for b in doubled]))
    assert np.allclose(emb.rows_for(keys), ref.rows_for(keys), rtol=1e-5, atol=1e-7)


def _gloo_rank(rank: int, world: int, port: int, batches: list[Batch], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from trainers.step import DistCommunicator

        torch.set_num_threads(1)
        model, emb, losses = _train(Step, DistCommunicator(), batches, rank, world)
        keys = np.unique(np.concatenate([batch_keys(b.sparse).ravel() for b in batches]))
        torch.save({"rows": torch.from_numpy(emb.rows_for(keys)),
                    "dense": [p.detach().clone() for p in model.parameters()]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_hold_the_same_rows_and_dense_model(tmp_path):
    batches = _batches(3, 4, 16)
    mp.spawn(_gloo_rank, args=(2, free_port(), batches, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    (rows0, dense0), (rows1, dense1) = [(g["rows"].numpy(), g["dense"]) for g in got]
    # Every rank holds every row and syncs every row read: the two copies are identical.
    assert np.array_equal(rows0, rows1)
    assert all(torch.equal(a, b) for a, b in zip(dense0, dense1))
    _, ref, _ = _train(Step, SoloCommunicator(), batches)
    keys = np.unique(np.concatenate([batch_keys(b.sparse).ravel() for b in batches]))
    # Against one process only the order of float sums differs (per-rank sums, then the all-reduce).
    assert np.allclose(rows0, ref.rows_for(keys), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- StoreIO
def test_storeio_fetches_in_issue_order_after_its_own_writebacks(redis_servers, open_store):
    servers = redis_servers(2)
    store = open_store(servers, dim=DIM, state_width=1, table_sizes=tuple(TABLES))
    io = StoreIO(store, wait_timeout_s=5)
    try:
        keys = make_keys(0, np.arange(10))
        io.fetch(0, keys, np.full(10, -1, np.int64))
        first = io.take(np.arange(10))
        assert np.array_equal(first, initial_rows(keys, DIM, 1, 0, TABLES))
        new = np.arange(10 * (DIM + 1), dtype=np.float32).reshape(10, DIM + 1)
        io.write_back(keys, new, 3)
        io.mark_iteration(3)
        # A fetch issued after the write-back, naming its version, reads the new values.
        io.fetch(10, keys[::-1], np.full(10, 3, np.int64))
        assert np.array_equal(io.take(np.arange(10, 20)), new[::-1])
        io.drain()
        assert io.written_through == 3 and io.rows_written == 10 and io.rows_fetched == 20
        with pytest.raises(StoreIOError, match="never issued or already used"):
            io.take(np.array([5]))
    finally:
        io.close()
        store.close()


def test_storeio_waits_for_a_version_then_gives_up_naming_the_row(redis_servers, open_store):
    servers = redis_servers(1)
    store = open_store(servers, dim=DIM, state_width=1, table_sizes=tuple(TABLES))
    io = StoreIO(store, wait_timeout_s=1.0)
    try:
        key = make_keys(1, np.array([7]))
        io.fetch(0, key, np.array([5], np.int64))  # version 5 was never written
        # The worker's own reason reaches the trainer: the row and the version it waited for.
        with pytest.raises(StoreIOError, match=f"row key {int(key[0])} still has version -1 < 5"):
            io.take(np.array([0]))
    finally:
        io.close()
        store.close()


# ---------------------------------------------------------------- OracleServer
def test_oracle_server_streams_plans_in_order_with_credits():
    from oracle.process import OracleServer, SegmentedPlans
    from bagpipe.config import RunConfig
    from trainers.planclient import PlanClient, PlanStreamError

    rng = np.random.default_rng(0)
    sparse = [np.stack([rng.integers(0, s, 8) for s in TABLES], axis=1) for _ in range(6)]
    cfg = RunConfig(policy="bagpipe", trainers=2, batch_size=8, iterations=6, cache_rows=40, lead=1, horizon=3,
                    max_ahead=2, embedding_dim=DIM, bottom_mlp=(8, DIM))

    class Batches(list):
        def epoch_of(self, i):
            return 0

    stream = SegmentedPlans(cfg, Batches(sparse), 6)
    server = OracleServer(stream, "job", "tcp://127.0.0.1:0", 2, cfg.max_ahead, 10.0)
    failure: list[BaseException] = []

    def serve():
        try:
            server.serve()
        except BaseException as exc:  # reported by the test below
            failure.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    clients = [PlanClient(server.endpoint, "job", r, 10.0, "", lambda i: 0) for r in range(2)]
    try:
        for i in range(6):
            for r, c in enumerate(clients):
                plan = c.next_plan(i)
                assert (plan.iteration, plan.rank, plan.read_slots.shape) == (i, r, (4, 3))
                assert plan.slots_needed <= cfg.cache_rows * (2 if cfg.oracle_config().bypasses else 1)  # the scratch
            for c in clients:
                c.credit(i, i)
        with pytest.raises(PlanStreamError, match="ended the plan stream before iteration 6"):
            clients[0].next_plan(6)
        thread.join(10)
        assert not thread.is_alive() and not failure
        assert server.done == [5, 5]
    finally:
        for c in clients:
            c.close()
        thread.join(10)
        server.close()


def test_oracle_server_names_a_trainer_that_acknowledges_out_of_order():
    from oracle.process import OracleError, OracleServer, SegmentedPlans
    from bagpipe.config import RunConfig
    from trainers.planclient import PlanClient

    sparse = [np.zeros((4, 3), np.int64) for _ in range(4)]
    cfg = RunConfig(policy="lru", trainers=1, batch_size=4, iterations=4, cache_rows=10, lead=0, horizon=0,
                    embedding_dim=DIM, bottom_mlp=(8, DIM))

    class Batches(list):
        def epoch_of(self, i):
            return 0

    server = OracleServer(SegmentedPlans(cfg, Batches(sparse), 4), "job", "tcp://127.0.0.1:0", 1, 16, 5.0)
    failure: list[BaseException] = []
    thread = threading.Thread(target=lambda: _catch(server.serve, failure))
    thread.start()
    client = PlanClient(server.endpoint, "job", 0, 5.0, "", lambda i: 0)
    try:
        client.next_plan(0)
        client.credit(2, 0)  # iteration 2 before 0
        thread.join(10)
        assert failure and isinstance(failure[0], OracleError)
        assert "trainer 0 acknowledged iteration 2, expected 0" in str(failure[0])
    finally:
        client.close()
        thread.join(10)
        server.close()


def _catch(fn, into: list) -> None:
    try:
        fn()
    except BaseException as exc:
        into.append(exc)


def _pooled_grads(fast: bool, base, indices, offsets, features, batch, weights):
    import trainers.cache as cache_module

    saved = cache_module._FBGEMM_LOOKUP
    cache_module._FBGEMM_LOOKUP = saved if fast else None
    try:
        leaf = base.clone().requires_grad_(True)
        out = cache_module.pooled_lookup(leaf, indices, offsets, features, batch)
        (out * weights).sum().backward()
        return out.detach(), leaf.grad
    finally:
        cache_module._FBGEMM_LOOKUP = saved


@pytest.fixture
def deterministic():
    """As every trainer runs (trainers.trainer.main), restored afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("fast", [True, False])
def test_pooled_lookup_gives_the_same_bits_whatever_slots_the_rows_sit_in(fast, deterministic):
    """What makes a cached run equal local bit for bit: relabel the leaf's rows (other slots, as a
    cache gives them) and every row still gets the same pooled values and the same gradient bits."""
    import trainers.cache as cache_module

    if fast:
        assert cache_module._FBGEMM_LOOKUP is not None, "fbgemm's dense lookup is missing: the CPU path got slower"
    rng = np.random.default_rng(5)
    features, batch, dim, rows = 3, 64, 5, 40
    lengths = rng.integers(0, 5, features * batch)  # empty bags included
    lengths[0] = 0
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    indices = torch.from_numpy(rng.integers(0, rows, int(lengths.sum())).astype(np.int64))  # many repeats
    base = torch.from_numpy(rng.standard_normal((rows, dim)).astype(np.float32))
    weights = torch.from_numpy(rng.standard_normal((batch, features * dim)).astype(np.float32))
    out, grad = _pooled_grads(fast, base, indices, offsets, features, batch, weights)
    perm = torch.from_numpy(rng.permutation(rows))  # new label of each row
    relabeled = torch.empty_like(base)
    relabeled[perm] = base
    out2, grad2 = _pooled_grads(fast, relabeled, perm[indices], offsets, features, batch, weights)
    assert torch.equal(out, out2) and torch.equal(grad, grad2[perm])
    assert torch.equal(out[0, :dim], torch.zeros(dim))  # the empty bag
    # The two paths pool to the same bits; their gradients sum in another order (allclose only).
    out_other, grad_other = _pooled_grads(not fast, base, indices, offsets, features, batch, weights)
    assert torch.equal(out, out_other) and torch.allclose(grad, grad_other, rtol=1e-5, atol=1e-6)
