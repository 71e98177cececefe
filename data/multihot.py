"""Multi-hot data from one-hot data, as MLPerf's DLRM-DCNv2 benchmark makes its own.

MLPerf trains DLRM-DCNv2 on Criteo 1TB made multi-hot: every one-hot id of
table t becomes a bag of ``bags[t]`` ids, the id itself and companions that
are a fixed function of it, so that a hot id's bag is as hot as the id and
the access skew survives. ``bagpipe data multi-hot`` does the same to a
prepared one-hot dataset (ours: its own companion rule, below) and writes a
prepared multi-hot dataset: the tables with a bag above one become list
columns (``list<int64>``), and ``meta.json``'s tables carry their ``bag``.

The companion rule: position j > 0 of table t's bag holds
``(id + offset[t, j]) mod num_embeddings``, with ``offset[t, j]`` in
``[1, num_embeddings)`` drawn from ``--seed``. With ``--lengths uniform``
each sample's bag keeps only its first L ids, L uniform in ``[0, bag]`` and a
pure function of (seed, row, table): empty bags (which pool to zero) and
every length in between occur. Tiny tables may repeat an id inside a bag;
training sums such a row's gradients like any other repeat.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bagpipe.dataset import PARQUET_WRITE_OPTIONS, SPLITS, Dataset, DatasetError, content_hash, file_schema
from bagpipe.keys import splitmix64
from bagpipe.progress import Progress

log = logging.getLogger("multi-hot")

# MLPerf DLRM-DCNv2's bag sizes per Criteo table (214 ids per sample).
MLPERF_BAGS = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)
LENGTHS = ("fixed", "uniform")
CREATED_BY = "bagpipe data multi-hot"


class MultiHotError(ValueError):
    """Bad arguments or input (the message names which)."""


@dataclass(frozen=True)
class MultiHotConfig:
    input: Path
    out: Path
    bags: tuple[int, ...]
    lengths: str = "fixed"
    seed: int = 0
    replace: bool = False

    def __post_init__(self) -> None:
        if self.lengths not in LENGTHS:
            raise MultiHotError(f"--lengths: must be one of {', '.join(LENGTHS)}, got {self.lengths!r}")
        if not self.bags or min(self.bags) < 1:
            raise MultiHotError(f"--bags: every bag size must be >= 1, got {list(self.bags)}")


def parse_bags(text: str, tables: int) -> tuple[int, ...]:
    """``mlperf``, one size for every table, or one per table (comma-separated)."""
    if text == "mlperf":
        if tables != len(MLPERF_BAGS):
            raise MultiHotError(f"--bags mlperf: MLPerf's sizes are for {len(MLPERF_BAGS)} tables; the input has "
                                f"{tables}")
        return MLPERF_BAGS
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise MultiHotError(f"--bags: {text!r} is not 'mlperf' or comma-separated integers") from None
    if len(sizes) == 1:
        sizes = sizes * tables
    if len(sizes) != tables:
        raise MultiHotError(f"--bags: {len(sizes)} sizes for {tables} tables")
    return sizes


def companion_offsets(sizes: np.ndarray, width: int, seed: int) -> np.ndarray:
    """offset[t, j] in [1, size_t) for j >= 1 (column 0 is the id itself): int64 [T, width]."""
    t = np.arange(len(sizes), dtype=np.uint64)[:, None]
    j = np.arange(width, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        h = splitmix64(splitmix64(np.uint64(seed) ^ np.uint64(0x6D756C7469)) + t * np.uint64(1 << 20) + j)
    span = np.maximum(sizes - 1, 1).astype(np.uint64)[:, None]
    off = (1 + h % span).astype(np.int64)
    off[:, 0] = 0
    return off


def bag_lengths(rows: np.ndarray, table: int, bag: int, seed: int) -> np.ndarray:
    """``--lengths uniform``: each row's bag length in [0, bag], from (seed, global row, table)."""
    with np.errstate(over="ignore"):
        h = splitmix64(rows.astype(np.uint64) * np.uint64(64) + np.uint64(table) + splitmix64(np.uint64(seed) + np.uint64(7)))
    return (h % np.uint64(bag + 1)).astype(np.int64)


def expand(ids: np.ndarray, size: int, offsets: np.ndarray, lengths: np.ndarray | None) -> pa.Array:
    """One table's one-hot ids [n] as a list<int64> array of bags."""
    bag = len(offsets)
    full = (ids[:, None].astype(np.int64) + offsets[None, :]) % max(size, 1)
    if lengths is None:
        starts = np.arange(0, (len(ids) + 1) * bag, bag, dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(starts), pa.array(full.reshape(-1)))
    keep = np.arange(bag)[None, :] < lengths[:, None]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(starts), pa.array(full[keep]))


def check_out(cfg: MultiHotConfig) -> None:
    """New or empty, or (with --replace) a dataset this command made; never the input."""
    out = cfg.out
    if out.resolve() == cfg.input.resolve() or cfg.input.resolve().is_relative_to(out.resolve()):
        raise MultiHotError(f"--out {out}: holds the input {cfg.input}; write the dataset somewhere else")
    if not out.exists():
        return
    if not out.is_dir():
        raise MultiHotError(f"--out {out}: exists and is not a directory")
    if not any(out.iterdir()):
        return
    try:
        made = json.loads((out / "meta.json").read_text()).get("created_by") == CREATED_BY
    except (OSError, ValueError, AttributeError):
        made = False
    if not made:
        raise MultiHotError(f"--out {out}: not empty and not a dataset made by `{CREATED_BY}`; give a new or "
                            "empty directory")
    if not cfg.replace:
        raise MultiHotError(f"--out {out}: already holds a multi-hot dataset; pass --replace to replace it")


def materialize(cfg: MultiHotConfig) -> dict:
    """Write the multi-hot dataset; returns its meta."""
    src = Dataset(cfg.input)
    if src.multi_hot:
        raise MultiHotError(f"--input {cfg.input}: already multi-hot (its tables have bags {src.bags})")
    if len(cfg.bags) != len(src.tables):
        raise MultiHotError(f"--bags: {len(cfg.bags)} sizes for the input's {len(src.tables)} tables")
    check_out(cfg)
    started = time.perf_counter()
    sizes = src.table_sizes
    offsets = companion_offsets(sizes, max(cfg.bags), cfg.seed)
    schema = file_schema(src.num_dense, src.sparse_names, list(cfg.bags))
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.out.parent / f".{cfg.out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    files: dict[str, list[str]] = {}
    ids_written = 0
    progress = Progress("multi-hot", src.num_rows("train") + src.num_rows("eval"), log)
    try:
        row_base = 0
        for split in SPLITS:
            files[split] = []
            groups = src.groups(split)
            (tmp / split).mkdir(parents=True)
            for k, path in enumerate(groups.paths):
                name = f"{split}/part-{k:05d}.parquet"
                files[split].append(name)
                reader = pq.ParquetFile(path, page_checksum_verification=True)
                with pq.ParquetWriter(tmp / name, schema, **PARQUET_WRITE_OPTIONS) as writer:
                    for g in range(reader.num_row_groups):
                        t = reader.read_row_group(g)
                        n = t.num_rows
                        rows = np.arange(row_base, row_base + n, dtype=np.int64)
                        row_base += n
                        cols = [t.column("label")] + [t.column(c) for c in src.dense_names]
                        for ti, (tname, bag) in enumerate(zip(src.sparse_names, cfg.bags)):
                            ids = t.column(tname).to_numpy()
                            if bag == 1:
                                cols.append(pa.array(ids))
                                ids_written += n
                                continue
                            lengths = bag_lengths(rows, ti, bag, cfg.seed) if cfg.lengths == "uniform" else None
                            arr = expand(ids, int(sizes[ti]), offsets[ti, :bag], lengths)
                            ids_written += len(arr.values)
                            cols.append(arr)
                        writer.write_table(pa.table(cols, schema=schema), row_group_size=n)
                        progress.add(n)
        meta = dict(src.meta)
        meta["tables"] = [{"name": n, "num_embeddings": int(s), "bag": int(b)}
                          for n, s, b in zip(src.sparse_names, sizes, cfg.bags)]
        meta["files"] = files
        meta["content_hash"] = content_hash(tmp, files["train"] + files["eval"])
        meta["created_by"] = CREATED_BY
        meta["multi_hot"] = {"from": str(cfg.input.resolve()), "from_content_hash": src.meta.get("content_hash"),
                             "bags": list(cfg.bags), "lengths": cfg.lengths, "seed": cfg.seed,
                             "companions": "(id + offset[t, j]) mod num_embeddings, offsets from the seed"}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        check_out(cfg)
        if cfg.out.exists():
            shutil.rmtree(cfg.out)
        os.replace(tmp, cfg.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    total = int(src.num_rows("train") + src.num_rows("eval"))
    log.info("wrote %d rows (%.1f ids per sample) to %s in %.1f s", total, ids_written / max(total, 1), cfg.out,
             elapsed)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagpipe data multi-hot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="a prepared one-hot dataset")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--bags", default="mlperf",
                        help="bag size per table: 'mlperf' (MLPerf DLRM-DCNv2's), N for all, or N1,N2,...")
    parser.add_argument("--lengths", default="fixed", choices=LENGTHS,
                        help="fixed: every bag full; uniform: lengths 0..bag (empty bags included)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replace", action="store_true", help="replace a multi-hot dataset at --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
                        datefmt="%H:%M:%S")
    try:
        tables = len(Dataset(args.input).tables)
        cfg = MultiHotConfig(args.input, args.out, parse_bags(args.bags, tables), args.lengths, args.seed,
                             args.replace)
        meta = materialize(cfg)
    except (MultiHotError, DatasetError) as exc:
        print(f"bagpipe data multi-hot: error: {exc}", file=sys.stderr)
        return 2
    per_sample = sum(t["bag"] for t in meta["tables"])
    print(f"{cfg.out}: {meta['rows']} train and {meta['eval_rows']} eval rows, bags {list(cfg.bags)} "
          f"(up to {per_sample} ids per sample, lengths {cfg.lengths})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
