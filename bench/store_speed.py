"""Embedding store throughput beside the ceiling Redis itself gives on the same machine.

    .venv/bin/python bench/store_speed.py [--rows 1000000] [--dim 64] [--shards 1,2,4] [--repeat 3] [--layouts]

For each shard count S it starts S local redis-server processes and times
``EmbeddingStore.put`` and ``.get`` of N random rows (dim floats + 1 Adagrad
state float + the int64 version), then the ceiling: the same bytes under the
same key names, written and read with redis-py directly (pipelined MSET/MGET
of ``CHUNK_KEYS`` keys, one thread per shard, the bytes prepared before the
clock starts and replies left unparsed). Prints rows/s, MB/s of row values
and the ratio ours/ceiling (best of ``--repeat`` runs each).

``--layouts`` first compares value layouts on one shard with raw redis-py:
one string per row (MGET/MSET) against rows packed into hash buckets
(HMGET/HSET, ~64 rows a bucket), in both Redis hash encodings; full-table
and trainer-batch-sized reads, and server memory per row.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import pathlib
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


import numpy as np
import redis

from bagpipe.config import StoreConfig
from bagpipe.keys import make_keys, stable_hash
from bagpipe.log import init_logger
from bagpipe.servers import RedisServers
from bagpipe.store import CHUNK_KEYS, PREFIX, EmbeddingStore

log = logging.getLogger("bagpipe.bench")
TABLES = 26
ROWS_PER_TABLE = 10_000_000


def random_rows(n: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """N distinct keys spread over 26 tables, and random float32 rows."""
    rng = np.random.default_rng(seed)
    keys = np.unique(make_keys(rng.integers(0, TABLES, 2 * n), rng.integers(0, ROWS_PER_TABLE, 2 * n)))
    keys = rng.permutation(keys)[:n]
    return keys, rng.random((n, width), dtype=np.float32)


def key_names(keys: np.ndarray) -> list[bytes]:
    rec = np.empty(len(keys), [("p", "S1"), ("k", ">i8")])
    rec["p"], rec["k"] = PREFIX, keys
    return rec.view(np.dtype((np.void, 9))).tolist()


def value_bytes(values: np.ndarray, version: int) -> list[bytes]:
    rec = np.empty(len(values), [("v", "<i8"), ("x", "<f4", (values.shape[1],))])
    rec["v"], rec["x"] = version, values
    return rec.view(np.dtype((np.void, rec.dtype.itemsize))).tolist()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def best(fn, repeat: int) -> float:
    return min(timed(fn) for _ in range(repeat))


class Ceiling:
    """Raw pipelined MSET/MGET of prepared bytes, one thread per shard: what Redis and redis-py allow."""

    def __init__(self, urls: list[str], keys: np.ndarray, values: np.ndarray) -> None:
        s = len(urls)
        shard = (stable_hash(keys) % np.uint64(s)).astype(np.int64)
        self.clients = [redis.Redis.from_url(u, socket_timeout=60) for u in urls]
        self.names, self.args = [], []
        for i in range(s):
            sel = np.flatnonzero(shard == i)
            names = key_names(keys[sel])
            args: list = [None] * (2 * len(sel))
            args[0::2], args[1::2] = names, value_bytes(values[sel], 1)
            self.names.append(names)
            self.args.append(args)
        self.pool = ThreadPoolExecutor(max_workers=s)

    def _each(self, fn) -> None:
        list(self.pool.map(fn, range(len(self.clients))))

    def put(self) -> None:
        def one(i: int) -> None:
            pipe = self.clients[i].pipeline(transaction=False)
            for a in range(0, len(self.names[i]), CHUNK_KEYS):
                pipe.execute_command("MSET", *self.args[i][2 * a:2 * (a + CHUNK_KEYS)])
            pipe.execute()
        self._each(one)

    def get(self) -> None:
        def one(i: int) -> None:
            pipe = self.clients[i].pipeline(transaction=False)
            for a in range(0, len(self.names[i]), CHUNK_KEYS):
                pipe.execute_command("MGET", *self.names[i][a:a + CHUNK_KEYS])
            pipe.execute()
        self._each(one)

    def close(self) -> None:
        self.pool.shutdown()
        for c in self.clients:
            c.close()


def bench_shards(shards: int, keys: np.ndarray, values: np.ndarray, dim: int, repeat: int,
                 workdir: pathlib.Path) -> list[dict]:
    n, width = values.shape
    mb = n * (8 + 4 * width) / 1e6
    cfg = StoreConfig(shards=shards, timeout_s=60)
    rows = []
    with RedisServers(cfg, workdir / f"shards-{shards}") as servers:
        store = EmbeddingStore(cfg, servers.urls, dim, width - dim, [ROWS_PER_TABLE] * TABLES)
        ceiling = Ceiling(servers.urls, keys, values)
        try:
            # Each put lands in an emptied store (inserts, not overwrites), ours and the ceiling alike.
            t: dict[str, list[float]] = {"put": [], "get": [], "raw_put": [], "raw_get": []}
            for _ in range(repeat):
                store.flush_all()
                t["put"].append(timed(lambda: store.put(keys, values, 1)))
                t["get"].append(timed(lambda: store.get(keys)))
                got, versions = store.get(keys[:1000])
                assert np.array_equal(got, values[:1000]) and (versions == 1).all()
                store.flush_all()
                t["raw_put"].append(timed(ceiling.put))
                t["raw_get"].append(timed(ceiling.get))
            for op in ("put", "get"):
                ours, raw = min(t[op]), min(t["raw_" + op])
                rows.append({"shards": shards, "op": op, "ours_rows_s": n / ours, "ours_mb_s": mb / ours,
                             "ceiling_rows_s": n / raw, "ceiling_mb_s": mb / raw, "ratio": raw / ours})
        finally:
            ceiling.close()
            store.close()
    return rows


def bench_layouts(n: int, width: int, workdir: pathlib.Path, batch: int = 4096) -> list[dict]:
    """One string per row against hash buckets of ~64 rows, raw redis-py on one shard."""
    keys, values = random_rows(n, width, seed=1)
    names, vals = key_names(keys), value_bytes(values, 1)
    sample = np.random.default_rng(2).choice(n, batch, replace=False)
    buckets = (stable_hash(keys, salt=7) % np.uint64(max(1, n // 64))).astype(np.int64)
    order = np.argsort(buckets, kind="stable")
    bounds = np.flatnonzero(np.diff(buckets[order])) + 1
    groups = np.split(order, bounds)
    bucket_names = [b"b" + int(buckets[g[0]]).to_bytes(8, "big") for g in groups]
    fields = keys.astype(">i8").view(np.dtype((np.void, 8))).tolist()
    cfg = StoreConfig(shards=1, timeout_s=60)
    out = []
    with RedisServers(cfg, workdir / "layouts") as servers:
        r = redis.Redis.from_url(servers.urls[0], socket_timeout=60)

        def used() -> int:
            return int(r.info("memory")["used_memory"])

        def strings_put() -> None:
            pipe = r.pipeline(transaction=False)
            for a in range(0, n, CHUNK_KEYS):
                args: list = [None] * 2 * len(names[a:a + CHUNK_KEYS])
                args[0::2], args[1::2] = names[a:a + CHUNK_KEYS], vals[a:a + CHUNK_KEYS]
                pipe.execute_command("MSET", *args)
            pipe.execute()

        def strings_get(idx: np.ndarray) -> None:
            sel = [names[i] for i in idx.tolist()]
            pipe = r.pipeline(transaction=False)
            for a in range(0, len(sel), CHUNK_KEYS):
                pipe.execute_command("MGET", *sel[a:a + CHUNK_KEYS])
            pipe.execute()

        def hash_put() -> None:
            pipe = r.pipeline(transaction=False)
            for name, g in zip(bucket_names, groups):
                args: list = [None] * 2 * len(g)
                args[0::2] = [fields[i] for i in g.tolist()]
                args[1::2] = [vals[i] for i in g.tolist()]
                pipe.execute_command("HSET", name, *args)
            pipe.execute()

        def hash_get(idx: np.ndarray) -> None:
            b = buckets[idx]
            o = np.argsort(b, kind="stable")
            pipe = r.pipeline(transaction=False)
            for part in np.split(idx[o], np.flatnonzero(np.diff(b[o])) + 1):
                pipe.execute_command("HMGET", b"b" + int(buckets[part[0]]).to_bytes(8, "big"),
                                     *[fields[i] for i in part.tolist()])
            pipe.execute()

        every = np.arange(n)
        layouts = [("string per row (MSET/MGET)", None, strings_put, strings_get),
                   ("hash buckets, hashtable encoding", None, hash_put, hash_get),
                   ("hash buckets, listpack encoding", "512", hash_put, hash_get)]
        for name, listpack_value, put, get in layouts:
            r.flushdb()
            r.config_set("hash-max-listpack-value", listpack_value or "64")
            base = used()
            t_put = best(put, 1)
            mem = (used() - base) / n
            t_all = best(lambda: get(every), 2)
            t_batch = best(lambda: get(sample), 5)
            out.append({"layout": name, "put_rows_s": n / t_put, "get_rows_s": n / t_all,
                        f"get{batch}_rows_s": batch / t_batch, "bytes_per_row": mem})
        r.close()
    return out


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/store_speed.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--shards", default="1,2,4", help="comma-separated shard counts")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement (best is reported)")
    p.add_argument("--layouts", action="store_true", help="also compare value layouts (raw redis-py, 1 shard)")
    p.add_argument("--layout-rows", type=int, default=200_000)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    init_logger("bench", level="WARNING")
    width = args.dim + 1  # row-wise Adagrad: one state float per row
    print(f"# bench/store_speed.py {' '.join(sys.argv[1:])}  ({datetime.datetime.now():%Y-%m-%d %H:%M}, "
          f"{platform.node()}, {os.cpu_count()} cores, redis-py {redis.__version__})")
    with tempfile.TemporaryDirectory(prefix="bagpipe-bench-store-") as tmp:
        workdir = pathlib.Path(tmp)
        if args.layouts:
            print(f"\nvalue layouts: {args.layout_rows} rows of {width} floats + version, 1 shard, raw redis-py")
            print(f"{'layout':<34} {'put rows/s':>12} {'get rows/s':>12} {'get 4096 rows/s':>16} {'B/row':>7}")
            for row in bench_layouts(args.layout_rows, width, workdir):
                print(f"{row['layout']:<34} {row['put_rows_s']:>12,.0f} {row['get_rows_s']:>12,.0f} "
                      f"{row['get4096_rows_s']:>16,.0f} {row['bytes_per_row']:>7.0f}")
        keys, values = random_rows(args.rows, width)
        print(f"\nEmbeddingStore vs raw redis-py: {args.rows} rows of {args.dim} + 1 floats "
              f"({8 + 4 * width} B/row with the version), best of {args.repeat}")
        print(f"{'shards':>6} {'op':>4} {'ours rows/s':>12} {'ours MB/s':>10} {'ceiling rows/s':>15} "
              f"{'ceiling MB/s':>13} {'ours/ceiling':>13}")
        for s in [int(x) for x in args.shards.split(",") if x]:
            for row in bench_shards(s, keys, values, args.dim, args.repeat, workdir):
                print(f"{row['shards']:>6} {row['op']:>4} {row['ours_rows_s']:>12,.0f} {row['ours_mb_s']:>10.0f} "
                      f"{row['ceiling_rows_s']:>15,.0f} {row['ceiling_mb_s']:>13.0f} {row['ratio']:>13.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
