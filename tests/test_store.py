"""The embedding store and its servers, against real redis-server processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bagpipe.store as store_module
from bagpipe.config import StoreConfig
from bagpipe.keys import initial_rows, make_keys, stable_hash
from bagpipe.servers import RedisServers, ServersError
from bagpipe.store import EmbeddingStore, StoreError, mask_url

ROOT = Path(__file__).resolve().parents[1]
TABLES = (1000, 50, 1 << 30)


def random_keys(rng: np.random.Generator, n: int) -> np.ndarray:
    """Distinct keys over the three test tables (row 0 and rows ending in a 0 byte included)."""
    tables = rng.integers(0, len(TABLES), 3 * n)
    rows = rng.integers(0, np.array(TABLES)[tables])
    keys = np.unique(np.concatenate([make_keys(tables, rows), make_keys(0, [0, 256]), make_keys(2, [1 << 32])]))
    return rng.permutation(keys)[:n]


def raw_clients(servers) -> list[redis.Redis]:
    return [redis.Redis.from_url(u, password=servers.cfg.password) for u in servers.urls]


def gone(pid: int) -> bool:
    """The process no longer runs (a zombie left for a reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------ round trips
@pytest.fixture(scope="module")
def three_shards(module_redis_servers):
    return module_redis_servers(3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 999)), max_size=200, unique=True),
       dim=st.integers(1, 40), state_width=st.integers(0, 2), version=st.integers(-1, 2**40),
       seed=st.integers(0, 2**31))
def test_round_trip_random_rows(three_shards, open_store, pairs, dim, state_width, version, seed):
    rng = np.random.default_rng(seed)
    keys = make_keys(np.array([t for t, _ in pairs], np.int64), np.array([r for _, r in pairs], np.int64))
    values = rng.standard_normal((len(keys), dim + state_width)).astype(np.float32)
    with open_store(three_shards, dim=dim, state_width=state_width, table_sizes=TABLES, seed=seed) as store:
        store.flush_all()
        store.put(keys, values, version)
        # Read back in another order, with repeats and with rows never written mixed in.
        unwritten = np.setdiff1d(make_keys(1, np.arange(40)), keys)[:5]
        query = np.concatenate([keys[::-1], keys[:3], unwritten])
        got, versions = store.get(query)
        expect = np.concatenate([values[::-1], values[:3],
                                 initial_rows(unwritten, dim, state_width, seed, np.array(TABLES))])
        assert got.dtype == np.float32 and got.shape == (len(query), dim + state_width)
        assert np.array_equal(got.view(np.uint32), expect.view(np.uint32))  # bitwise
        assert versions.dtype == np.int64
        assert (versions[:len(keys) + min(3, len(keys))] == version).all()
        assert (versions[len(query) - len(unwritten):] == -1).all()


def test_round_trip_many_commands_per_shard(redis_servers, store_factory, monkeypatch):
    # Small commands, so that every call is cut into many MGET/MSET commands per shard.
    monkeypatch.setattr(store_module, "CHUNK_KEYS", 7)
    store = store_factory(redis_servers(3))
    keys = random_keys(np.random.default_rng(0), 1000)
    values = np.random.default_rng(1).random((1000, 9), dtype=np.float32)
    versions = np.arange(1000, dtype=np.int64)
    store.put(keys, values, versions)
    got, ver = store.get(keys)
    assert np.array_equal(got, values) and np.array_equal(ver, versions)


def test_put_checks_its_arguments(redis_servers, store_factory):
    store = store_factory(redis_servers(1))
    with pytest.raises(ValueError, match=r"shape \(2, 8\); expected \(2, 9\)"):
        store.put(np.array([1, 2]), np.zeros((2, 8), np.float32), 0)
    with pytest.raises(ValueError, match="3 versions for 2 rows"):
        store.put(np.array([1, 2]), np.zeros((2, 9), np.float32), np.arange(3))
    with pytest.raises(ValueError, match="negative row key"):
        store.get(np.array([-5]))
    values, versions = store.get(np.zeros(0, np.int64))
    assert values.shape == (0, 9) and versions.shape == (0,)
    store.put(np.zeros(0, np.int64), np.zeros((0, 9), np.float32), 0)


# --------------------------------------------------- initial values, versions
def test_unwritten_rows_read_initial_values_and_are_not_written(redis_servers, store_factory):
    servers = redis_servers(2)
    store = store_factory(servers, dim=16, state_width=1, table_sizes=TABLES, seed=7)
    keys = random_keys(np.random.default_rng(3), 5000)
    values, versions = store.get(keys)
    assert np.array_equal(values, initial_rows(keys, 16, 1, 7, np.array(TABLES)))
    assert (versions == -1).all()
    assert (values[:, 16] == 0).all()  # optimizer state starts at zero
    assert [c.dbsize() for c in raw_clients(servers)] == [0, 0]


def test_versions_scalar_per_row_and_overwrite(redis_servers, store_factory):
    store = store_factory(redis_servers(2), dim=4, state_width=0)
    keys = make_keys(0, np.arange(10))
    values = np.arange(40, dtype=np.float32).reshape(10, 4)
    store.put(keys, values, 3)
    assert (store.get(keys)[1] == 3).all()
    store.put(keys[:5], values[:5] + 1, np.arange(10, 15))
    got, versions = store.get(keys)
    assert versions.tolist() == [10, 11, 12, 13, 14, 3, 3, 3, 3, 3]
    assert np.array_equal(got[:5], values[:5] + 1) and np.array_equal(got[5:], values[5:])
    # A row written with version -1 (rows loaded from a checkpoint) is stored all the same.
    store.put(make_keys(1, [3]), np.ones((1, 4), np.float32), -1)
    assert make_keys(1, [3])[0] in np.concatenate([k for k, _ in store.scan_rows()])


def test_initial_values_are_the_same_in_another_process(redis_servers, store_factory, tmp_path):
    servers = redis_servers(2)
    keys = random_keys(np.random.default_rng(4), 2000)
    here, _ = store_factory(servers, dim=12, state_width=1, table_sizes=TABLES, seed=11).get(keys)
    np.save(tmp_path / "keys.npy", keys)
    code = (
        "import sys, numpy as np\n"
        "from bagpipe.config import StoreConfig\n"
        "from bagpipe.store import EmbeddingStore\n"
        f"s = EmbeddingStore(StoreConfig(seed=11), {servers.urls!r}, 12, 1, {list(TABLES)!r})\n"
        f"np.save({str(tmp_path / 'there.npy')!r}, s.get(np.load({str(tmp_path / 'keys.npy')!r}))[0])\n"
        "s.close()\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60,
                   env={**os.environ, "PYTHONHASHSEED": "123"})
    there = np.load(tmp_path / "there.npy")
    assert np.array_equal(here.view(np.uint32), there.view(np.uint32))


# ------------------------------------------------------------------ sharding
def test_rows_spread_over_shards_by_stable_hash(redis_servers, store_factory):
    servers = redis_servers(4)
    store = store_factory(servers)
    n = 20_000
    keys = random_keys(np.random.default_rng(5), n)
    store.put(keys, np.zeros((n, 9), np.float32), 0)
    clients = raw_clients(servers)
    sizes = [c.dbsize() for c in clients]
    assert sum(sizes) == n
    assert all(abs(s - n / 4) < 0.05 * n / 4 for s in sizes), sizes
    # Each row lives on shard stable_hash(key) % S: the rule every machine applies.
    home = (stable_hash(keys[:50]) % np.uint64(4)).astype(int)
    for key, shard in zip(keys[:50].tolist(), home.tolist()):
        assert clients[shard].exists(b"e" + key.to_bytes(8, "big")) == 1
    store.validate()


def test_scan_rows_yields_every_stored_row_once(redis_servers, store_factory):
    store = store_factory(redis_servers(3))
    keys = random_keys(np.random.default_rng(6), 5000)
    values = np.random.default_rng(7).random((5000, 9), dtype=np.float32)
    store.put(keys, values, 1)
    chunks = list(store.scan_rows(chunk=1000))
    assert all(len(k) <= 1000 and v.shape == (len(k), 9) for k, v in chunks)
    got_keys = np.concatenate([k for k, _ in chunks])
    got_values = np.concatenate([v for _, v in chunks])
    assert len(got_keys) == len(np.unique(got_keys)) == 5000
    order = np.argsort(keys)
    found = np.searchsorted(keys[order], got_keys)
    assert np.array_equal(keys[order][found], got_keys)
    assert np.array_equal(values[order][found], got_values)
    store.flush_all()
    assert list(store.scan_rows()) == []


def test_redis_cluster_round_trip(redis_servers, store_factory):
    servers = redis_servers(3, cluster=True)
    store = store_factory(servers, dim=8, state_width=1)
    assert store.shards == 3
    n = 6000
    keys = random_keys(np.random.default_rng(8), n)
    values = np.random.default_rng(9).random((n, 9), dtype=np.float32)
    store.put(keys[:4000], values[:4000], np.arange(4000))
    got, versions = store.get(keys)
    assert np.array_equal(got[:4000], values[:4000])
    assert np.array_equal(versions, np.concatenate([np.arange(4000), np.full(2000, -1)]))
    assert np.array_equal(got[4000:], initial_rows(keys[4000:], 8, 1, 0, np.array(TABLES)))
    sizes = [c.dbsize() for c in raw_clients(servers)]
    assert sum(sizes) == 4000 and min(sizes) > 4000 / 3 * 0.8, sizes  # every master holds its share
    assert sorted(np.concatenate([k for k, _ in store.scan_rows()]).tolist()) == sorted(keys[:4000].tolist())
    store.validate()
    store.flush_all()
    assert (store.get(keys[:10])[1] == -1).all()
    with pytest.raises(StoreError, match="is a Redis Cluster node: give it as the cluster URL"):
        EmbeddingStore(StoreConfig(), servers.urls, 8, 1, list(TABLES))
    # A lost master: the slot map is refreshed once, then the error names the node.
    store.put(keys, values, 1)
    os.kill(servers.pids[1], signal.SIGKILL)
    with pytest.raises(StoreError, match=f"cluster node 127.0.0.1:{servers.ports[1]} is unreachable"):
        store.get(keys)


# ------------------------------------------------------------ failures
def test_shard_killed_mid_batch_raises_naming_it(redis_servers, store_factory):
    servers = redis_servers(2)
    store = store_factory(servers, dim=32, state_width=1, timeout_s=2.0)
    keys = random_keys(np.random.default_rng(10), 100_000)
    store.put(keys, np.ones((len(keys), 33), np.float32), 0)
    failure: dict = {}

    def reader() -> None:
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                store.get(keys)
        except StoreError as exc:
            failure["at"], failure["error"] = time.monotonic(), exc

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.3)
    killed_at = time.monotonic()
    os.kill(servers.pids[1], signal.SIGKILL)
    thread.join(30)
    assert "error" in failure, "get() went on after its shard was killed"
    message = str(failure["error"])
    assert f"shard 1 at 127.0.0.1:{servers.ports[1]}" in message
    assert failure["at"] - killed_at < 2.0 + 1.0
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"shard 1 at 127.0.0.1:{servers.ports[1]}"):
        store.get(keys)
    assert time.monotonic() - started < 2.0 + 1.0
    # Rows of the live shard are still served.
    live = keys[(stable_hash(keys) % np.uint64(2)) == 0][:100]
    assert (store.get(live)[1] == 0).all()


def test_stopped_server_times_out_instead_of_hanging(redis_servers, store_factory):
    servers = redis_servers(2)
    store = store_factory(servers, timeout_s=0.5)
    keys = random_keys(np.random.default_rng(11), 1000)
    os.kill(servers.pids[0], signal.SIGSTOP)  # alive but silent, like a host gone from the network
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=f"shard 0 at 127.0.0.1:{servers.ports[0]} did not answer within 0.5s"):
            store.get(keys)
        assert time.monotonic() - started < 0.5 + 1.0
    finally:
        os.kill(servers.pids[0], signal.SIGCONT)


def test_unreachable_shard_at_start(redis_bin):
    port = _free_port()
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"shard 0 at 127.0.0.1:{port} is unreachable"):
        EmbeddingStore(StoreConfig(timeout_s=1.0), [f"redis://127.0.0.1:{port}/0"], 4, 0, [10])
    assert time.monotonic() - started < 2.0


def test_password_from_env_url_and_wrong_password(redis_servers, open_store, monkeypatch):
    monkeypatch.setenv("BAGPIPE_TEST_PASSWORD", "s3cret pass\"word")
    servers = redis_servers(2, password_env="BAGPIPE_TEST_PASSWORD")
    port = servers.ports[0]
    # Never on a command line; the config file holding it is private.
    for pid in servers.pids:
        assert b"s3cret" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    conf = servers.workdir / "shard-0" / "redis.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert all("s3cret" not in u for u in servers.urls)

    with open_store(servers, password_env="BAGPIPE_TEST_PASSWORD") as store:
        store.put(make_keys(0, [1]), np.ones((1, 9), np.float32), 2)
    monkeypatch.setenv("BAGPIPE_WRONG_PASSWORD", "not-the-one")
    for env in ("BAGPIPE_WRONG_PASSWORD", "BAGPIPE_UNSET_PASSWORD"):
        with pytest.raises(StoreError, match=f"authentication failed for shard 0 at 127.0.0.1:{port}") as info:
            open_store(servers, password_env=env)
        assert "not-the-one" not in str(info.value) and "s3cret" not in str(info.value)
    # A password in the URL wins over the environment.
    quoted = "s3cret%20pass%22word"
    urls = [u.replace("redis://", f"redis://:{quoted}@") for u in servers.urls]
    assert "s3cret" not in mask_url(urls[0])
    with EmbeddingStore(StoreConfig(password_env="BAGPIPE_WRONG_PASSWORD"), urls, 8, 1, [10]) as store:
        assert store.get(make_keys(0, [1]))[1].tolist() == [2]


def test_value_of_wrong_size_names_the_row(redis_servers, store_factory):
    servers = redis_servers(1)
    store = store_factory(servers, dim=8, state_width=1)
    keys = make_keys(2, [5, 77, 9])
    store.put(keys, np.ones((3, 9), np.float32), 0)
    raw_clients(servers)[0].set(b"e" + int(keys[1]).to_bytes(8, "big"), b"x" * 10)
    with pytest.raises(StoreError, match=r"row key \d+ \(table 2, row 77\) on shard 0 at .* is 10 bytes, "
                                         r"expected 44"):
        store.get(keys)


def test_validate_detects_another_dim_and_another_shard_count(redis_servers, store_factory):
    servers = redis_servers(2)
    wide = store_factory(servers, dim=8, state_width=1)
    wide.put(random_keys(np.random.default_rng(12), 500), np.ones((500, 9), np.float32), 0)
    wide.validate()
    narrow = store_factory(servers, dim=4, state_width=1)
    with pytest.raises(StoreError, match=r"the store holds rows of 9 floats; this job expects 5 "
                                         r"\(embedding_dim 4 \+ optimizer state 1\)"):
        narrow.validate()
    swapped = EmbeddingStore(StoreConfig(), servers.urls[::-1], 8, 1, list(TABLES))
    try:
        with pytest.raises(StoreError, match="belongs on shard"):
            swapped.validate()
    finally:
        swapped.close()


def test_latency_and_bandwidth_stand_ins(redis_servers, store_factory):
    servers = redis_servers(2)
    keys = random_keys(np.random.default_rng(13), 200)
    fast = store_factory(servers)
    started = time.perf_counter()
    fast.get(keys)
    base = time.perf_counter() - started
    slow = store_factory(servers, latency_us=100_000)
    started = time.perf_counter()
    slow.get(keys)
    took = time.perf_counter() - started
    # One round trip per shard, the shards in parallel: one latency in all.
    assert 0.1 <= took < 0.1 + base + 0.1, took
    # 5000 rows of 32 floats through a 10 Mbit/s link: (9 + 8 + 128) bytes a row.
    narrow = store_factory(servers, dim=31, state_width=1, bandwidth_gbps=0.01)
    n = 5000
    expected = n * (9 + 8 + 4 * 32) * 8 / 0.01e9
    started = time.perf_counter()
    narrow.put(random_keys(np.random.default_rng(14), n), np.zeros((n, 32), np.float32), 0)
    took = time.perf_counter() - started
    assert expected <= took < expected + 0.5, (took, expected)


# ------------------------------------------------------------------ servers
def test_servers_stop_leaves_no_process(redis_servers):
    servers = redis_servers(3)
    pids = servers.pids
    assert len(pids) == 3 and not any(gone(p) for p in pids)
    assert all(c.ping() for c in raw_clients(servers))
    servers.stop()
    assert all(gone(p) for p in pids)
    servers.stop()  # idempotent


def test_port_in_use_and_missing_binary(tmp_path, redis_bin, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        servers = RedisServers(StoreConfig(shards=1, base_port=port), tmp_path / "a")
        with pytest.raises(ServersError, match=f"port {port} on 127.0.0.1 for shard 0 is already in use"):
            servers.start()
        assert all(gone(p) for p in servers.pids)
    monkeypatch.setenv("BAGPIPE_REDIS_SERVER", str(tmp_path / "no-such-redis-server"))
    with pytest.raises(ServersError, match="redis-server binary not found"):
        RedisServers(StoreConfig(shards=1), tmp_path / "b").start()


def test_appendonly_rows_survive_sigkill_and_restart(redis_servers, store_factory, open_store):
    servers = redis_servers(1, persistence="appendonly", appendfsync="always")
    keys = random_keys(np.random.default_rng(15), 3000)
    values = np.random.default_rng(16).random((3000, 9), dtype=np.float32)
    with open_store(servers) as store:
        store.put(keys, values, 42)
    old = servers.pids[0]
    os.kill(old, signal.SIGKILL)
    assert wait_gone([old]) or not servers.alive()[0]
    servers.restart_shard(0)
    assert servers.pids[0] != old
    got, versions = store_factory(servers).get(keys)
    assert np.array_equal(got, values) and (versions == 42).all()


def _read_started(proc: subprocess.Popen) -> dict:
    """Read `bagpipe servers` output up to its JSON line."""
    urls = []
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("{"):
            return {**json.loads(line), "printed": urls}
        urls.append(line)
    raise AssertionError(f"bagpipe servers exited early: {proc.stderr.read()}")


def test_servers_command_prints_urls_and_stops_on_sigterm(tmp_path, redis_bin):
    proc = subprocess.Popen([sys.executable, "-m", "bagpipe", "servers", "--shards", "2", "--dir", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = _read_started(proc)
        assert info["printed"] == info["urls"] and len(info["urls"]) == 2
        assert all(redis.Redis.from_url(u).ping() for u in info["urls"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert wait_gone(info["pids"], 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_servers_die_when_their_launcher_is_killed(tmp_path, redis_bin):
    proc = subprocess.Popen([sys.executable, "-m", "bagpipe", "servers", "--shards", "2", "--dir", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = _read_started(proc)
        proc.kill()  # SIGKILL: no finally, no atexit; only the kernel's parent-death signal is left
        proc.wait()
        assert wait_gone(info["pids"], 10), "redis-server outlived its launcher"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
