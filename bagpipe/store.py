"""The embedding servers' client: every row of every table, held in Redis.

Layout (chosen by measurement, see docs/store.md): one Redis string per row.

- key: ``b"e"`` + the row key (``table << 40 | row``) as 8 big-endian bytes,
  9 bytes in all. In a Redis Cluster the key carries a hash tag,
  ``b"e{" + 3 hex digits + b"}"`` + 8 bytes, that puts it in one of
  ``CLUSTER_GROUPS`` groups so one MGET/MSET serves a whole group.
- value: the version (int64, little-endian: the iteration after which the
  row was written back) then the ``dim + state_width`` float32 columns
  (embedding, then optimizer state), ``8 + 4 * width`` bytes.

Rows are spread over S shards by ``stable_hash(key) % S`` (the same on every
machine), or routed by the cluster's slot map. A row never written is not
stored: it reads as ``initial_rows(...)`` with version -1, and reading it
writes nothing.

Every call is batched: keys are grouped per shard, each shard gets one
pipeline of MGET/MSET commands of at most ``CHUNK_KEYS`` keys, and the
shards run in parallel threads (redis-py and hiredis release the GIL on
socket I/O). Keys and values are packed and unpacked with numpy, never one
row at a time in Python.

Failures raise ``StoreError`` naming the shard (index and host:port) or the
row; nothing blocks longer than ``cfg.timeout_s`` per socket operation, and
redis-py's own retries are off so that bound holds.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import unquote, urlsplit

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from bagpipe.config import StoreConfig
from bagpipe.keys import initial_rows, key_row, key_table, stable_hash

log = logging.getLogger("bagpipe.store")

PREFIX = b"e"
CHUNK_KEYS = 10_000  # keys per MGET/MSET command
CLUSTER_GROUPS = 1024  # hash-tag groups in cluster mode (spread over the 16384 slots)
VERSION_BYTES = 8

_KEY_DTYPE = np.dtype([("prefix", "S1"), ("key", ">i8")])
_CLUSTER_KEY_DTYPE = np.dtype([("prefix", "S2"), ("tag", "S3"), ("close", "S1"), ("key", ">i8")])


class StoreError(RuntimeError):
    """A store failure: names the shard (index and host:port) or the row at fault."""


def mask_url(url: str) -> str:
    """A URL fit for logs and messages: any user:password part replaced."""
    return re.sub(r"//[^/@]*@", "//***@", url)


@dataclass
class _Target:
    """One server a call talks to: a shard, or a cluster master."""

    label: str  # "shard 1 at 127.0.0.1:6380" / "cluster node 127.0.0.1:7001"
    client: redis.Redis
    shard: int = -1


@dataclass
class _Batch:
    """The keys of one call that go to one target, cut into commands."""

    target: _Target
    pos: np.ndarray | None  # positions in the call's key array (None: all of them, in order)
    cuts: list[int]  # command i covers pos[cuts[i]:cuts[i + 1]]
    tags: np.ndarray | None = None  # cluster mode: the hash-tag group of each key


class EmbeddingStore:
    """Rows (embedding + optimizer state + version) on Redis shards or a Redis Cluster.

    ``urls``: one ``redis://[:password@]host:port/db`` per shard, or, when
    ``cfg.cluster_url`` is set, any node(s) of a cluster. The password comes
    from the URL or else from the environment variable ``cfg.password_env``.
    Thread-safe: calls from several threads each use their own connections.
    """

    def __init__(self, cfg: StoreConfig, urls: list[str], dim: int, state_width: int,
                 table_sizes: list[int]) -> None:
        if dim < 1 or state_width < 0:
            raise ValueError(f"dim must be >= 1 and state_width >= 0, got {dim} and {state_width}")
        self.cfg = cfg
        self.dim = dim
        self.state_width = state_width
        self.width = dim + state_width
        self.table_sizes = np.asarray(table_sizes, dtype=np.int64)
        self.value_bytes = VERSION_BYTES + 4 * self.width
        self._row_dtype = np.dtype([("version", "<i8"), ("values", "<f4", (self.width,))])
        self._link = threading.Lock()  # the network stand-in's one shared link
        self._password = cfg.password
        self._cluster: redis.RedisCluster | None = None
        self._shards: list[_Target] = []
        self._cluster_targets: dict[str, _Target] = {}
        self._closed = False
        if cfg.cluster_url:
            self._key_dtype = _CLUSTER_KEY_DTYPE
            self._open_cluster(cfg.cluster_url)
        else:
            urls = list(urls) or list(cfg.urls)
            if not urls:
                raise StoreError("no store URLs given (one redis://host:port/db per shard)")
            seen = [mask_url(u) for u in urls]
            for i, u in enumerate(seen):
                if u in seen[:i]:
                    # The same server twice would hold rows under two shard indices: refuse it.
                    raise StoreError(f"shard {i} repeats shard {seen.index(u)}: {u} is listed twice")
            self._key_dtype = _KEY_DTYPE
            self._shards = [self._open_shard(i, u) for i, u in enumerate(urls)]
        # Rows of RESP arguments as they go on the wire: "$<len>\r\n<bytes>\r\n" per key and value.
        self._key_head = b"$%d\r\n" % self._key_dtype.itemsize
        self._value_head = b"$%d\r\n" % self.value_bytes
        key_part = [("kh", f"S{len(self._key_head)}"), ("key", self._key_dtype), ("kt", "S2")]
        self._get_dtype = np.dtype(key_part)
        self._put_dtype = np.dtype(key_part + [("vh", f"S{len(self._value_head)}"), ("version", "<i8"),
                                               ("values", "<f4", (self.width,)), ("vt", "S2")])
        workers = len(self._shards) if self._shards else max(3, len(self._primaries()))
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="store")
        # Connect now: a wrong password or a server that is down is reported at start-up.
        try:
            self._run(self._each_target, lambda b: self._check_server(b.target))
        except BaseException:
            self.close()
            raise
        if self._shards:
            log.info("store: %d shard(s): %s", len(self._shards), " ".join(mask_url(u) for u in urls))

    # ------------------------------------------------------------------ public
    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``keys``: float32 [n, width] and int64 versions [n] (-1: never written)."""
        values, versions, _ = self._fetch(keys)
        return values, versions

    def put(self, keys: np.ndarray, values: np.ndarray, version: int | np.ndarray) -> None:
        """Write rows (float32 [n, width]) with a version (one for all, or one per row)."""
        keys = self._check_keys(keys)
        n = len(keys)
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (n, self.width):
            raise ValueError(f"put: values have shape {values.shape}; expected ({n}, {self.width})")
        versions = np.asarray(version, dtype=np.int64)
        if versions.ndim and versions.shape != (n,):
            raise ValueError(f"put: {versions.shape[0]} versions for {n} rows")
        if n == 0:
            return

        def work(batch: _Batch) -> None:
            sel = slice(None) if batch.pos is None else batch.pos
            m = n if batch.pos is None else len(batch.pos)
            # The MSET commands' wire bytes, built in place: per row "$9\r\n<key>\r\n$268\r\n<row>\r\n".
            wire = np.empty(m, self._put_dtype)
            wire["kh"], wire["kt"], wire["vh"], wire["vt"] = self._key_head, b"\r\n", self._value_head, b"\r\n"
            self._fill_names(wire["key"], keys[sel], batch.tags)
            wire["version"] = versions[sel] if versions.ndim else versions
            wire["values"] = values[sel]
            self._exchange(batch, "MSET", 2, wire)
            self._network(m * (self._key_dtype.itemsize + self.value_bytes))

        self._run(lambda: self._route(keys), work)

    def flush_all(self) -> None:
        """Empty every shard (a fresh job). Memory is freed in the background (FLUSHDB ASYNC)."""
        self._run(self._each_target, lambda b: b.target.client.flushdb(asynchronous=True))

    def scan_rows(self, chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every stored row, each once: (keys int64 [m], values float32 [m, width]) per chunk.

        Meant for a quiescent store (after training, for export or a
        checkpoint). Redis's SCAN may repeat a key, so each server's keys are
        gathered (8 bytes per row) and de-duplicated before rows are read.
        """
        for target in self._all_targets():
            found = np.unique(self._scan_keys(target, chunk))
            for start in range(0, len(found), chunk):
                part = found[start:start + chunk]
                values, _, present = self._fetch(part)
                if not present.all():  # deleted since the scan
                    part, values = part[present], values[present]
                if len(part):
                    yield part, values

    def validate(self, sample: int = 100) -> None:
        """Sample stored rows and check their size (and, for shards, their placement).

        Raises StoreError when the store holds rows of another width than
        ``dim + state_width`` (a store left by a job with another
        embedding_dim or optimizer) or, with shards, a row on a shard its
        key does not hash to (a store written with another number of shards).
        """
        targets = self._all_targets()
        per = max(1, -(-sample // len(targets)))
        for target in targets:
            with _errors(target.label, self._password, self.cfg.timeout_s):
                pipe = target.client.pipeline(transaction=False)
                for _ in range(per):
                    pipe.randomkey()
                names = sorted({k for k in pipe.execute() if k is not None and self._is_row_key(k)})
                if not names:
                    continue
                pipe = target.client.pipeline(transaction=False)
                for k in names:
                    pipe.strlen(k)
                sizes = pipe.execute()
            keys = self._decode_keys(names)
            for key, size in zip(keys.tolist(), sizes):
                if size and size != self.value_bytes:  # 0: deleted since RANDOMKEY
                    raise StoreError(self._size_message(key, size, target.label))
            if target.shard >= 0 and len(self._shards) > 1:
                home = (stable_hash(keys) % np.uint64(len(self._shards))).astype(np.int64)
                wrong = np.flatnonzero(home != target.shard)
                if len(wrong):
                    k = int(keys[wrong[0]])
                    raise StoreError(f"{target.label} holds row key {k} ({_row_name(k)}) that belongs on shard "
                                     f"{int(home[wrong[0]])}: the store was written with another number or order "
                                     f"of shards than the {len(self._shards)} given")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if hasattr(self, "_pool"):  # absent when __init__ failed early
            self._pool.shutdown(wait=True)
        for t in self._shards:
            t.client.close()
        if self._cluster is not None:
            self._cluster.close()

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def shards(self) -> int:
        """Servers the rows are spread over (shards, or the cluster's masters)."""
        return len(self._shards) if self._shards else len(self._primaries())

    # ----------------------------------------------------------- connections
    def _client_kwargs(self) -> dict:
        t = self.cfg.timeout_s
        return dict(socket_timeout=t, socket_connect_timeout=t, socket_keepalive=True)

    def _tls_kwargs(self, scheme: str) -> dict:
        """rediss:// is TLS; with config key 'redis_tls_dir' the server must show a certificate its CA signed."""
        if scheme != "rediss":
            return {}
        if not self.cfg.tls_dir:
            return dict(ssl=True)
        from bagpipe.tls import TlsError, tls_files

        try:
            ca = tls_files(self.cfg.tls_dir)["ca"]
        except TlsError as exc:
            raise StoreError(str(exc)) from None
        return dict(ssl=True, ssl_ca_certs=str(ca), ssl_cert_reqs="required")

    def _open_shard(self, i: int, url: str) -> _Target:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise StoreError(f"store URL {i} ({mask_url(url)}) is not redis://[:password@]host:port/db")
        try:
            port = parts.port or 6379
            db = int(parts.path.strip("/") or 0)
        except ValueError:
            raise StoreError(f"store URL {i} ({mask_url(url)}) has a bad port or db number") from None
        password = unquote(parts.password) if parts.password else self._password
        if parts.password:
            self._password = password  # scrubbed from any message
        client = redis.Redis(host=parts.hostname, port=port, db=db, password=password,
                             username=unquote(parts.username) if parts.username else None,
                             **self._tls_kwargs(parts.scheme),
                             # No silent retries: a dead shard must fail within timeout_s.
                             retry=Retry(NoBackoff(), 0), **self._client_kwargs())
        return _Target(f"shard {i} at {parts.hostname}:{port}", client, i)

    def _open_cluster(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.password:
            self._password = unquote(parts.password)
        host, port = parts.hostname, parts.port or 6379
        try:
            with _errors(f"cluster node {host}:{port}", self._password, self.cfg.timeout_s):
                self._cluster = redis.RedisCluster(
                    host=host, port=port, password=self._password,
                    username=unquote(parts.username) if parts.username else None,
                    **self._tls_kwargs(parts.scheme), retry=Retry(NoBackoff(), 1), **self._client_kwargs())
        except redis.exceptions.RedisClusterException as exc:
            raise StoreError(f"cannot reach the Redis Cluster at {host}:{port}: "
                             f"{_scrub(str(exc), self._password)}") from None
        tags = [f"{g:03x}".encode() for g in range(CLUSTER_GROUPS)]
        self._tags = np.array(tags, dtype="S3")
        self._tag_slots = np.array([key_slot(b"{" + t + b"}") for t in tags], dtype=np.int64)
        log.info("store: Redis Cluster at %s (%d masters)", mask_url(url), len(self._primaries()))

    def _primaries(self) -> list:
        return self._cluster.get_primaries() if self._cluster is not None else []

    def _node_target(self, node) -> _Target:
        target = self._cluster_targets.get(node.name)
        if target is None:
            client = self._cluster.get_redis_connection(node)
            target = _Target(f"cluster node {node.name}", client)
            self._cluster_targets[node.name] = target
        return target

    def _all_targets(self) -> list[_Target]:
        return self._shards or [self._node_target(n) for n in self._primaries()]

    def _check_server(self, target: _Target) -> None:
        target.client.ping()
        if target.shard >= 0 and str(target.client.info("cluster").get("cluster_enabled", 0)) == "1":
            # Multi-key commands would fail on most keys (CROSSSLOT/MOVED): say what to do instead.
            raise StoreError(f"{target.label} is a Redis Cluster node: give it as the cluster URL "
                             "(config key 'redis_cluster_url'), not as a shard")

    def _each_target(self) -> list[_Batch]:
        return [_Batch(t, None, []) for t in self._all_targets()]

    # ---------------------------------------------------------------- routing
    def _check_keys(self, keys: np.ndarray) -> np.ndarray:
        keys = np.ascontiguousarray(keys, dtype=np.int64).reshape(-1)
        if len(keys) and keys.min() < 0:
            raise ValueError(f"negative row key {int(keys.min())}")
        return keys

    def _route(self, keys: np.ndarray) -> list[_Batch]:
        """Group a call's keys by target and cut each group into commands of <= CHUNK_KEYS keys."""
        n = len(keys)
        if self._cluster is not None:
            return self._route_cluster(keys)
        s = len(self._shards)
        if s == 1:
            return [_Batch(self._shards[0], None, _cuts(0, n))]
        shard = (stable_hash(keys) % np.uint64(s)).astype(np.uint16)
        order = np.argsort(shard, kind="stable")  # a radix sort for 16-bit values
        bounds = np.concatenate([[0], np.cumsum(np.bincount(shard, minlength=s))])
        return [_Batch(self._shards[i], order[bounds[i]:bounds[i + 1]], _cuts(0, bounds[i + 1] - bounds[i]))
                for i in range(s) if bounds[i + 1] > bounds[i]]

    def _route_cluster(self, keys: np.ndarray) -> list[_Batch]:
        # MGET/MSET must stay within one slot: keys are grouped by their hash tag, and
        # a node gets one command per group (cut further past CHUNK_KEYS).
        groups = (stable_hash(keys) % np.uint64(CLUSTER_GROUPS)).astype(np.uint16)
        order = np.argsort(groups, kind="stable")
        counts = np.bincount(groups, minlength=CLUSTER_GROUPS)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        nodes = self._cluster.nodes_manager
        per_node: dict[str, tuple[_Target, list[np.ndarray]]] = {}
        for g in np.flatnonzero(counts).tolist():
            node = nodes.get_node_from_slot(int(self._tag_slots[g]))
            target = self._node_target(node)
            per_node.setdefault(node.name, (target, []))[1].append(order[bounds[g]:bounds[g + 1]])
        batches = []
        for target, parts in per_node.values():
            cuts = [0]
            for p in parts:
                cuts += _cuts(cuts[-1], cuts[-1] + len(p))[1:]
            pos = np.concatenate(parts)
            batches.append(_Batch(target, pos, cuts, groups[pos]))
        return batches

    def _fill_names(self, field: np.ndarray, keys: np.ndarray, tags: np.ndarray | None) -> None:
        """Write the Redis key names of ``keys`` into a structured field of ``self._key_dtype``."""
        if self._cluster is not None:
            field["prefix"] = PREFIX + b"{"
            field["tag"] = self._tags[tags]
            field["close"] = b"}"
        else:
            field["prefix"] = PREFIX
        field["key"] = keys

    def _exchange(self, batch: _Batch, command: str, args_per_row: int, wire: np.ndarray) -> list:
        """Send one command per cut of ``wire`` (rows of pre-encoded RESP arguments) on one
        connection, all before reading any reply (a pipeline), and return the replies.

        The requests are built with numpy rather than by redis-py's packer, which would need
        one Python bytes object per key and per value; replies are parsed by redis-py.
        """
        raw = wire.view(np.uint8).reshape(len(wire), wire.dtype.itemsize)
        buffers: list = []
        for a, b in zip(batch.cuts[:-1], batch.cuts[1:]):
            name = command.encode()
            buffers.append(b"*%d\r\n$%d\r\n%s\r\n" % (1 + args_per_row * (b - a), len(name), name))
            buffers.append(memoryview(raw[a:b]).cast("B"))
        pool = batch.target.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(buffers, check_health=False)
            return [conn.read_response() for _ in range(len(batch.cuts) - 1)]
        except BaseException:
            conn.disconnect()  # replies may be left unread: never hand this connection out again
            raise
        finally:
            pool.release(conn)

    def _is_row_key(self, name: bytes) -> bool:
        return len(name) == self._key_dtype.itemsize and name.startswith(PREFIX)

    def _decode_keys(self, names: list[bytes]) -> np.ndarray:
        if not names:
            return np.zeros(0, np.int64)
        return np.frombuffer(b"".join(names), self._key_dtype)["key"].astype(np.int64)

    # ------------------------------------------------------------------ reads
    def _fetch(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows, versions, and whether each row is stored."""
        keys = self._check_keys(keys)
        n = len(keys)
        out = np.empty((n, self.width), np.float32)
        versions = np.full(n, -1, np.int64)
        present = np.zeros(n, bool)
        if n == 0:
            return out, versions, present

        def work(batch: _Batch) -> None:
            pos = np.arange(n) if batch.pos is None else batch.pos
            sel = slice(None) if batch.pos is None else batch.pos
            wire = np.empty(len(pos), self._get_dtype)
            wire["kh"], wire["kt"] = self._key_head, b"\r\n"
            self._fill_names(wire["key"], keys[sel], batch.tags)
            replies = self._exchange(batch, "MGET", 1, wire)
            self._network(len(pos) * (self._key_dtype.itemsize + self.value_bytes))
            for a, b, reply in zip(batch.cuts[:-1], batch.cuts[1:], replies):
                where = slice(a, b) if batch.pos is None else pos[a:b]
                self._decode(reply, where, keys, out, versions, present, batch.target.label)
            missing = pos[~present[pos]]
            if len(missing):
                out[missing] = initial_rows(keys[missing], self.dim, self.state_width, self.cfg.seed,
                                            self.table_sizes)

        self._run(lambda: self._route(keys), work)
        return out, versions, present

    def _decode(self, reply: list, where: slice | np.ndarray, keys: np.ndarray, out: np.ndarray,
                versions: np.ndarray, present: np.ndarray, label: str) -> None:
        """Unpack one MGET reply into the output rows at ``where``."""
        m = len(reply)
        absent = reply.count(None)
        if absent == m:
            return
        if absent:
            stored = np.fromiter((v is not None for v in reply), bool, m)
            where = (np.arange(where.start, where.stop) if isinstance(where, slice) else where)[stored]
            reply = [v for v in reply if v is not None]
        sizes = set(map(len, reply))
        if sizes != {self.value_bytes}:
            at = next(j for j, v in enumerate(reply) if len(v) != self.value_bytes)
            idx = (np.arange(where.start, where.stop) if isinstance(where, slice) else where)[at]
            raise StoreError(self._size_message(int(keys[idx]), len(reply[at]), label))
        rows = np.frombuffer(b"".join(reply), self._row_dtype)
        out[where] = rows["values"]
        versions[where] = rows["version"]
        present[where] = True

    def _size_message(self, key: int, size: int, label: str) -> str:
        floats = (size - VERSION_BYTES) / 4
        held = f"{int(floats)} floats" if floats.is_integer() and floats >= 0 else f"{size}-byte values"
        return (f"the store holds rows of {held}; this job expects {self.width} (embedding_dim {self.dim} + "
                f"optimizer state {self.state_width}): row key {key} ({_row_name(key)}) on {label} is "
                f"{size} bytes, expected {self.value_bytes} (8-byte version + {self.width} float32)")

    def _scan_keys(self, target: _Target, chunk: int) -> np.ndarray:
        found = []
        cursor = 0
        with _errors(target.label, self._password, self.cfg.timeout_s):
            while True:
                cursor, names = target.client.scan(cursor, match=PREFIX + b"*", count=chunk)
                names = [k for k in names if self._is_row_key(k)]
                if names:
                    found.append(self._decode_keys(names))
                if cursor == 0:
                    break
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    # ------------------------------------------------------------ execution
    def _run(self, route: Callable[[], list[_Batch]], fn: Callable[[_Batch], None]) -> None:
        """Run ``fn`` on every batch of ``route()``, the targets in parallel; raise the first failure
        once all have finished (they write into shared output arrays).

        In cluster mode a MOVED/ASK/CLUSTERDOWN reply or a lost connection
        refreshes the slot map and the call runs once more, routed afresh
        (reads and writes are idempotent).
        """
        if self._closed:
            raise StoreError("the store is closed")
        try:
            self._run_once(route(), fn, retry=self._cluster is not None)
        except _Rerouted:
            with _errors("the Redis Cluster", self._password, self.cfg.timeout_s):
                self._cluster.nodes_manager.initialize()
            self._cluster_targets.clear()
            self._run_once(route(), fn, retry=False)

    def _run_once(self, batches: list[_Batch], fn: Callable[[_Batch], None], retry: bool) -> None:
        def guarded(batch: _Batch) -> None:
            try:
                fn(batch)
            except _REROUTE as exc:
                if retry:
                    raise _Rerouted() from None
                raise _store_error(batch.target.label, exc, self._password, self.cfg.timeout_s) from None
            except redis.exceptions.RedisError as exc:
                raise _store_error(batch.target.label, exc, self._password, self.cfg.timeout_s) from None

        if len(batches) == 1:
            guarded(batches[0])
            return
        futures = [self._pool.submit(guarded, b) for b in batches]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        # A real failure wins over a request to re-route.
        errors.sort(key=lambda e: isinstance(e, _Rerouted))
        if errors:
            raise errors[0]

    def _network(self, nbytes: int) -> None:
        """The network stand-in: a round trip's latency, and the bytes through one shared link."""
        if self.cfg.latency_us:
            time.sleep(self.cfg.latency_us * 1e-6)
        if self.cfg.bandwidth_gbps:
            with self._link:
                time.sleep(nbytes * 8 / (self.cfg.bandwidth_gbps * 1e9))


class _Rerouted(Exception):
    """The cluster's slot map changed under a call."""


_REROUTE = (redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.ClusterDownError,
            redis.exceptions.TryAgainError, redis.exceptions.ConnectionError)


def _cuts(start: int, stop: int) -> list[int]:
    return list(range(start, stop, CHUNK_KEYS)) + [stop]


def _row_name(key: int) -> str:
    return f"table {int(key_table(key))}, row {int(key_row(key))}"


def _scrub(text: str, password: str | None) -> str:
    return text.replace(password, "***") if password else text


def _store_error(label: str, exc: Exception, password: str | None, timeout_s: float) -> StoreError:
    """A redis-py error as a StoreError naming the server; the password never appears."""
    text = _scrub(str(exc), password)
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return StoreError(f"authentication failed for {label}: {text}")
    if isinstance(exc, redis.exceptions.TimeoutError):
        return StoreError(f"{label} did not answer within {timeout_s}s (store timeout): {text}")
    if isinstance(exc, redis.exceptions.ConnectionError):
        return StoreError(f"{label} is unreachable: {text}")
    return StoreError(f"{label}: {text}")


@contextmanager
def _errors(label: str, password: str | None, timeout_s: float) -> Iterator[None]:
    try:
        yield
    except redis.exceptions.RedisError as exc:
        raise _store_error(label, exc, password, timeout_s) from None
