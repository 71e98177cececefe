"""Shared fixtures: real ``redis-server`` processes on free loopback ports, never fakes.

- ``redis_servers``: a factory, ``redis_servers(shards=2, cluster=False, **store_fields)``,
  that starts ``RedisServers`` (or a ``RedisClusterServers`` of >= 3 masters)
  in the test's ``tmp_path`` and stops every one of them at teardown.
- ``module_redis_servers``: the same factory shared by a test module (for
  hypothesis tests and anything that wants servers started once).
- ``store_factory``: ``store_factory(servers, dim=8, state_width=1, table_sizes=..., **store_fields)``
  returns an ``EmbeddingStore`` on those servers, closed at teardown;
  ``open_store`` is the same function for callers that close the store themselves.

Tests needing these are skipped, with the reason, on a machine without redis-server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from bagpipe.config import StoreConfig
from bagpipe.servers import RedisClusterServers, RedisServers, ServersError, redis_server_binary
from bagpipe.store import EmbeddingStore

Servers = RedisServers | RedisClusterServers


class ServerFactory:
    """Starts redis-server sets under one directory and stops all of them in ``stop_all``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[Servers] = []

    def __call__(self, shards: int = 2, *, cluster: bool = False, **store_fields) -> Servers:
        cfg = StoreConfig(shards=shards, **store_fields)
        kind = RedisClusterServers if cluster else RedisServers
        servers = kind(cfg, self.root / f"redis-{len(self.started)}")
        self.started.append(servers)
        servers.start()
        return servers

    def stop_all(self) -> None:
        for servers in self.started:
            servers.stop()


@pytest.fixture(scope="session")
def redis_bin() -> str:
    """The redis-server binary, or the test is skipped saying why."""
    try:
        return redis_server_binary()
    except ServersError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def redis_servers(tmp_path: Path, redis_bin: str) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def module_redis_servers(tmp_path_factory: pytest.TempPathFactory, redis_bin: str) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path_factory.mktemp("redis"))
    try:
        yield factory
    finally:
        factory.stop_all()


def _open_store(servers: Servers, dim: int = 8, state_width: int = 1,
               table_sizes: tuple[int, ...] = (1000, 50, 1 << 30), **store_fields) -> EmbeddingStore:
    """An EmbeddingStore on ``servers`` (shards or a cluster); the caller closes it."""
    if isinstance(servers, RedisClusterServers):
        cfg = StoreConfig(shards=servers.count, cluster_url=servers.cluster_url, **store_fields)
        urls = [servers.cluster_url]
    else:
        cfg = StoreConfig(shards=servers.count, **store_fields)
        urls = servers.urls
    return EmbeddingStore(cfg, urls, dim, state_width, list(table_sizes))


@pytest.fixture(scope="session")
def open_store() -> Callable[..., EmbeddingStore]:
    """``open_store(servers, dim=8, state_width=1, table_sizes=..., **store_fields)``: a store the caller closes."""
    return _open_store


@pytest.fixture
def store_factory() -> Iterator[Callable[..., EmbeddingStore]]:
    stores: list[EmbeddingStore] = []

    def make(servers: Servers, **kwargs) -> EmbeddingStore:
        store = _open_store(servers, **kwargs)
        stores.append(store)
        return store

    try:
        yield make
    finally:
        for store in stores:
            store.close()


@pytest.fixture(scope="session")
def small_criteo(tmp_path_factory) -> Path:
    """A prepared synthetic Criteo-format dataset for whole-job tests (40k rows, small tables).

    Made through the same commands a user runs: ``bagpipe data synth`` and
    ``bagpipe data prepare``. Tables are hashed into at most 2000 ids so
    that short jobs reuse rows (and caches matter).
    """
    from data.prepare import main as prepare
    from data.synth import main as synth

    root = tmp_path_factory.mktemp("criteo")
    assert synth(["--format", "criteo", "--rows", "40000", "--out", str(root / "raw"), "--seed", "3",
                  "--files", "2"]) == 0
    inputs = sorted(str(p) for p in (root / "raw").iterdir())
    assert prepare(["--format", "criteo", "--input", *inputs, "--out", str(root / "prepared"),
                    "--hash-buckets", "2000", "--eval-fraction", "0.05"]) == 0
    return root / "prepared"
