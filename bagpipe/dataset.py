"""Global batches of a prepared dataset, in a seeded block-shuffled order.

The order of an epoch is a pure function of (dataset, seed, epoch), built so
that memory stays bounded whatever the dataset's size (the whole dataset is
never permuted):

1. the split's row groups, in a permuted order (a keyed hash of the group
   index sorts them);
2. taken in *windows* of G consecutive groups (G groups hold about
   ``shuffle_window_rows`` rows, 1M by default);
3. the rows of each window permuted (a keyed hash of the row's position);
4. global batch i is rows [i*B, (i+1)*B) of that stream (a batch may straddle
   two windows); rank r of W gets the contiguous part [r*B/W, (r+1)*B/W).

A run of several epochs reads them one after another (``epochs=E``): batch i
of the run is batch i mod n of epoch i // n, n full batches an epoch, each
epoch in its own order. The oracle plans across the boundary like anywhere
else: the next epoch's order is as known as this one's.

With ``shuffle=False`` the stream is the rows in file order. A dataset no
larger than one window gets a full permutation. Readers keep the last few
windows they loaded (an LRU), so sequential reads and short look-aheads load
each window once.

Nothing is read wrong: every page of a prepared file carries a CRC-32
(Parquet's page checksum, written by ``prepare``) that is verified as it is
read, every file's schema is checked against the layout, and every row id is
checked against its table's size in ``meta.json`` as its row group is loaded.
A failed check raises ``DatasetError`` naming the file, row group and column.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bagpipe.keys import splitmix64

SPLITS = ("train", "eval")
DEFAULT_WINDOW_ROWS = 1 << 20
CACHED_WINDOWS = 2
_REQUIRED_META = ("version", "format", "rows", "eval_rows", "num_dense", "tables")


# How prepared files are written (``data.prepare``): Snappy pages, each with its CRC-32, which
# every reader here verifies.
PARQUET_WRITE_OPTIONS = {"compression": "snappy", "write_page_checksum": True}


class DatasetError(ValueError):
    """A directory that is not a readable prepared dataset (the message says why)."""


def file_schema(num_dense: int, table_names: list[str], bags: list[int] | None = None) -> pa.Schema:
    """The columns of every prepared file: label, dense features (float32), one id column per table:
    int64 for a one-hot table, list<int64> (a bag of 0 to ``bag`` ids per sample) for a multi-hot one."""
    bags = bags or [1] * len(table_names)
    fields = [pa.field("label", pa.float32())]
    fields += [pa.field(f"dense_{i}", pa.float32()) for i in range(num_dense)]
    fields += [pa.field(name, pa.int64() if bag == 1 else pa.list_(pa.int64())) for name, bag in zip(table_names, bags)]
    return pa.schema(fields)


PAD = -1  # an unused position of a bag in a batch's [b, S] id matrix


def column_tables(bags: list[int] | np.ndarray) -> np.ndarray:
    """The table of each column of a batch's id matrix: table t owns ``bags[t]`` adjacent columns."""
    return np.repeat(np.arange(len(bags), dtype=np.int64), np.asarray(bags, dtype=np.int64))


def padded_bags(column: pa.ChunkedArray | pa.Array, width: int, dtype) -> np.ndarray:
    """A list<int64> column as [n, width] ids, each bag left-aligned and padded with ``PAD``."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.flatten().to_numpy()
    lengths = np.diff(offsets)
    out = np.full((n, width), PAD, dtype=dtype)
    row = np.repeat(np.arange(n), lengths)
    pos = np.arange(len(values)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    out[row, pos] = values
    return out


def content_hash(root: Path, files: list[str]) -> str:
    """``meta.json``'s ``content_hash``: sha256 over, per file (relative to ``root``, in order), its
    relative path, a NUL byte and its bytes."""
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode() + b"\0")
        with open(root / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class ReadConfig:
    """One reader's view: batch size (global), order and slice; validated on construction."""

    batch_size: int
    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    world_size: int = 1
    rank: int = 0
    split: str = "train"
    shuffle_window_rows: int = DEFAULT_WINDOW_ROWS

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.world_size < 1:
            raise ValueError(f"world_size: must be >= 1, got {self.world_size}")
        if self.batch_size % self.world_size:
            raise ValueError(f"world_size: {self.world_size} does not divide batch_size {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: must be in [0, world_size={self.world_size}), got {self.rank}")
        if self.split not in SPLITS:
            raise ValueError(f"split: must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.epoch < 0:
            raise ValueError(f"epoch: must be >= 0, got {self.epoch}")
        if self.shuffle_window_rows < 1:
            raise ValueError(f"shuffle_window_rows: must be >= 1, got {self.shuffle_window_rows}")


@dataclass
class Batch:
    """One rank's part of a global batch."""

    dense: np.ndarray  # float32 [b, D], C-contiguous
    labels: np.ndarray  # float32 [b]
    sparse: np.ndarray  # int64 [b, S] row ids, C-contiguous: table t's bag in its columns (column_tables), PAD after
    iteration: int


def _key(*parts: int) -> np.uint64:
    """A 64-bit key mixing integers (seed, epoch, ...) with splitmix64."""
    h = np.uint64(0x243F6A8885A308D3)
    with np.errstate(over="ignore"):
        for p in parts:
            h = splitmix64(np.array([h ^ np.uint64(p & 0xFFFFFFFFFFFFFFFF)], dtype=np.uint64))[0]
    return h


def keyed_permutation(n: int, key: np.uint64) -> np.ndarray:
    """A permutation of range(n) that depends only on (n, key): indices sorted by a keyed hash.

    splitmix64 is a bijection of uint64, so the hashes are distinct and the
    order has no ties; unlike numpy's Generator.permutation it cannot change
    with the numpy version.
    """
    with np.errstate(over="ignore"):
        h = splitmix64(np.arange(n, dtype=np.uint64) ^ key)
    return np.argsort(h, kind="stable")


def open_parquet(path: Path, schema: pa.Schema) -> pq.ParquetFile:
    """A prepared file, opened to verify every page's checksum as it is read, its schema checked."""
    try:
        f = pq.ParquetFile(path, page_checksum_verification=True)
        got = f.schema_arrow
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DatasetError(f"{path}: cannot read Parquet metadata ({exc})") from None
    if not got.equals(schema):
        have = {fld.name: fld.type for fld in got}
        for fld in schema:
            if have.get(fld.name) != fld.type:
                found = f"type {have[fld.name]}" if fld.name in have else "no such column"
                raise DatasetError(f"{path}: column {fld.name}: expected {fld.type}, found {found} "
                                   "(damaged, or not written by `bagpipe data prepare`)")
        raise DatasetError(f"{path}: columns {got.names} are not the dataset's {schema.names}")
    return f


class _Groups:
    """The row groups of one split, in file order: (file index, group in file, rows)."""

    def __init__(self, root: Path, files: list[str], schema: pa.Schema) -> None:
        self.paths = [root / f for f in files]
        file_of, group_of, rows = [], [], []
        for k, p in enumerate(self.paths):
            md = open_parquet(p, schema).metadata
            for g in range(md.num_row_groups):
                file_of.append(k)
                group_of.append(g)
                rows.append(md.row_group(g).num_rows)
        self.file_of = np.array(file_of, dtype=np.int64)
        self.group_of = np.array(group_of, dtype=np.int64)
        self.rows = np.array(rows, dtype=np.int64)


class Dataset:
    """A prepared dataset directory (``bagpipe data prepare``): its meta and its batch readers."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DatasetError(f"{self.path} is not a prepared dataset: {meta_path} is missing "
                               "(run `bagpipe data prepare`)")
        try:
            self.meta: dict = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{meta_path}: not valid JSON ({exc})") from None
        if not isinstance(self.meta, dict):
            raise DatasetError(f"{meta_path}: expected a JSON object")
        for key in _REQUIRED_META:
            if key not in self.meta:
                raise DatasetError(f"{meta_path}: key '{key}' is missing")
        try:
            self.tables: list[tuple[str, int]] = [(str(t["name"]), int(t["num_embeddings"])) for t in self.meta["tables"]]
            self.num_dense = int(self.meta["num_dense"])
        except (TypeError, KeyError, ValueError) as exc:
            raise DatasetError(f"{meta_path}: key 'tables' or 'num_dense' is malformed ({exc})") from None
        if not self.tables:
            raise DatasetError(f"{meta_path}: key 'tables' is empty")
        self.dense_names = [f"dense_{i}" for i in range(self.num_dense)]
        self.sparse_names = [name for name, _ in self.tables]
        try:
            # The most ids a sample has in each table (1: one-hot); a batch's id matrix has sum(bags) columns.
            self.bags = [int(t.get("bag", 1)) for t in self.meta["tables"]]
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{meta_path}: a table's 'bag' is malformed ({exc})") from None
        if min(self.bags) < 1:
            raise DatasetError(f"{meta_path}: a table's 'bag' must be >= 1, got {min(self.bags)}")
        self.multi_hot = max(self.bags) > 1
        self.column_tables = column_tables(self.bags)
        self.schema = file_schema(self.num_dense, self.sparse_names, self.bags)
        self.table_sizes = np.array([n for _, n in self.tables], dtype=np.int64)
        # Row ids are held as int32 in memory when every table allows it (half the memory).
        self.id_dtype = np.int32 if max(n for _, n in self.tables) <= np.iinfo(np.int32).max else np.int64
        self._groups: dict[str, _Groups] = {}
        self._lock = threading.Lock()

    def num_rows(self, split: str = "train") -> int:
        """Rows of a split ('train' or 'eval')."""
        if split not in SPLITS:
            raise ValueError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
        return int(self.meta["rows"] if split == "train" else self.meta["eval_rows"])

    def groups(self, split: str) -> _Groups:
        with self._lock:
            if split not in self._groups:
                files = self.meta.get("files", {}).get(split)
                if files is None:  # a directory without the list: every part, in name order
                    files = sorted(p.relative_to(self.path).as_posix() for p in (self.path / split).glob("*.parquet"))
                g = _Groups(self.path, files, self.schema)
                if int(g.rows.sum()) != self.num_rows(split):
                    raise DatasetError(f"{self.path}: the {split} files hold {int(g.rows.sum())} rows, "
                                       f"meta.json says {self.num_rows(split)}")
                self._groups[split] = g
            return self._groups[split]

    @property
    def page_checksums(self) -> bool:
        """Whether prepare wrote a CRC-32 into every page (datasets prepared before it did: no)."""
        return self.meta.get("page_checksums") is True

    def verify_content_hash(self) -> None:
        """Read every file once and compare with meta.json's ``content_hash`` (for datasets without
        page checksums, whose damage no read would find)."""
        files = [f for split in SPLITS for f in self.meta.get("files", {}).get(split, [])]
        try:
            got = content_hash(self.path, files)
        except OSError as exc:
            raise DatasetError(f"{self.path}: cannot read {exc.filename or 'a file'} ({exc.strerror})") from None
        if got != self.meta.get("content_hash"):
            raise DatasetError(f"{self.path}: the Parquet files do not match meta.json's content_hash "
                               "(changed or damaged since `bagpipe data prepare` wrote them)")

    def batches(self, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                world_size: int = 1, rank: int = 0, split: str = "train", *,
                shuffle_window_rows: int = DEFAULT_WINDOW_ROWS, epochs: int = 1) -> "BatchReader | Epochs":
        """This rank's part of every full global batch of ``batch_size`` rows (see the module doc),
        for ``epochs`` epochs from ``epoch`` on."""
        def open_epoch(e: int) -> BatchReader:
            return BatchReader(self, ReadConfig(batch_size, seed, e, shuffle, world_size, rank, split,
                                                shuffle_window_rows))
        return open_epoch(epoch) if epochs == 1 else Epochs(open_epoch, epoch, epochs)

    def sparse_batches(self, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                       split: str = "train", *, shuffle_window_rows: int = DEFAULT_WINDOW_ROWS,
                       epochs: int = 1) -> "SparseBatches | Epochs":
        """Row ids [B, T] of every full global batch; reads only the categorical columns."""
        def open_epoch(e: int) -> SparseBatches:
            return SparseBatches(self, ReadConfig(batch_size, seed, e, shuffle, 1, 0, split, shuffle_window_rows))
        return open_epoch(epoch) if epochs == 1 else Epochs(open_epoch, epoch, epochs)


class Epochs:
    """Several epochs as one sequence of batches: ``run[i]`` is batch i mod n of epoch first + i // n.

    Keeps the readers of the two most recent epochs touched (a planner's
    window or a prefetching trainer straddles a boundary), so memory stays
    that of two readers.
    """

    def __init__(self, open_epoch, first: int, epochs: int) -> None:
        if epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {epochs}")
        self._open = open_epoch
        self.first = first
        self.epochs = epochs
        self._readers: OrderedDict[int, object] = OrderedDict()
        self._lock = threading.Lock()  # trainers read the next batch from a background thread
        first_reader = self._reader(first)
        self.per_epoch = len(first_reader)
        self.column_tables = getattr(first_reader, "column_tables", None)

    def _reader(self, epoch: int):
        with self._lock:
            reader = self._readers.pop(epoch, None)
            if reader is None:
                reader = self._open(epoch)
            self._readers[epoch] = reader
            while len(self._readers) > 2:
                self._readers.popitem(last=False)
            return reader

    def epoch_of(self, i: int) -> int:
        return self.first + i // self.per_epoch

    def __len__(self) -> int:
        return self.per_epoch * self.epochs

    def __getitem__(self, i: int):
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"batch index must be an integer, got {type(i).__name__}")
        j = int(i) + len(self) if i < 0 else int(i)
        if not 0 <= j < len(self):
            raise IndexError(f"batch {i} out of range: {self.epochs} epochs of {self.per_epoch} batches")
        return self._reader(self.first + j // self.per_epoch)[j % self.per_epoch]


class _Stream:
    """The epoch's row stream as windows of row groups, loaded on demand and kept in an LRU."""

    def __init__(self, ds: Dataset, cfg: ReadConfig, with_dense: bool) -> None:
        self.ds, self.cfg, self.with_dense = ds, cfg, with_dense
        self.groups = ds.groups(cfg.split)
        n_groups = len(self.groups.rows)
        nominal = int(ds.meta.get("rows_per_group") or (self.groups.rows.max() if n_groups else 1))
        per_window = max(1, cfg.shuffle_window_rows // max(1, nominal))
        seed = cfg.seed & 0xFFFFFFFFFFFFFFFF
        order = keyed_permutation(n_groups, _key(seed, cfg.epoch, 1)) if cfg.shuffle else np.arange(n_groups)
        self.windows = [order[i:i + per_window] for i in range(0, n_groups, per_window)]
        sizes = np.array([int(self.groups.rows[w].sum()) for w in self.windows], dtype=np.int64)
        self.window_start = np.concatenate([[0], np.cumsum(sizes)])
        self.total = int(self.window_start[-1])
        self.seed = seed
        self.cache: OrderedDict[int, tuple[np.ndarray, ...]] = OrderedDict()
        self.files: dict[int, pq.ParquetFile] = {}
        self.lock = threading.Lock()

    def _file(self, k: int) -> pq.ParquetFile:
        if k not in self.files:
            self.files[k] = open_parquet(self.groups.paths[k], self.ds.schema)
        return self.files[k]

    def _read_group(self, g: int, columns: list[str]) -> pa.Table:
        """Row group g of the split (every page's checksum verified, every id checked against its table)."""
        k, gi = int(self.groups.file_of[g]), int(self.groups.group_of[g])
        path = self.groups.paths[k]
        try:
            t = self._file(k).read_row_group(gi, columns=columns)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise DatasetError(_damage(path, gi, columns, exc)) from None
        if t.num_rows != self.groups.rows[g]:
            raise DatasetError(f"{path}: row group {gi} holds {t.num_rows} rows, its metadata says "
                               f"{self.groups.rows[g]}")
        for name in columns:
            if t.column(name).null_count:
                raise DatasetError(f"{path}: row group {gi}, column {name}: {t.column(name).null_count} "
                                   "missing values (prepared data has none)")
        for name, size, bag in zip(self.ds.sparse_names, self.ds.table_sizes.tolist(), self.ds.bags):
            if name not in columns:
                continue
            col = t.column(name)
            if bag == 1:
                ids = col.to_numpy()
                where = "row {r} of the group"
            else:
                arr = col.combine_chunks()
                lengths = np.diff(arr.offsets.to_numpy())
                if len(lengths) and lengths.max() > bag:
                    r = int(np.argmax(lengths))
                    raise DatasetError(f"{path}: row group {gi}, column {name}: row {r} of the group has a bag of "
                                       f"{int(lengths[r])} ids; meta.json's 'tables' gives at most {bag}")
                ids = arr.flatten().to_numpy()
                where = "id {r} of the group's bags"
            if len(ids) and (ids.min() < 0 or ids.max() >= size):
                r = int(np.flatnonzero((ids < 0) | (ids >= size))[0])
                raise DatasetError(f"{path}: row group {gi}, column {name}: id {int(ids[r])} ({where.format(r=r)}) "
                                   f"is outside the table's {size} rows that meta.json's 'tables' gives")
        return t

    def _load(self, w: int) -> tuple[np.ndarray, ...]:
        """(labels, dense, sparse) of window w, rows in stream order."""
        columns = (["label"] + self.ds.dense_names if self.with_dense else []) + self.ds.sparse_names
        tables = [self._read_group(int(g), columns) for g in self.windows[w]]
        n = sum(t.num_rows for t in tables)
        sparse = np.empty((n, len(self.ds.column_tables)), dtype=self.ds.id_dtype)
        first_column = np.concatenate([[0], np.cumsum(self.ds.bags)])
        rows = n if self.with_dense else 0  # the sparse view loads no labels or dense features
        labels = np.empty(rows, dtype=np.float32)
        dense = np.empty((rows, self.ds.num_dense), dtype=np.float32)
        at = 0
        for t in tables:
            m = t.num_rows
            for j, (name, bag) in enumerate(zip(self.ds.sparse_names, self.ds.bags)):
                lo = first_column[j]
                if bag == 1:
                    sparse[at:at + m, lo] = t.column(name).to_numpy()
                else:
                    sparse[at:at + m, lo:lo + bag] = padded_bags(t.column(name), bag, self.ds.id_dtype)
            if self.with_dense:
                labels[at:at + m] = t.column("label").to_numpy()
                for j, name in enumerate(self.ds.dense_names):
                    dense[at:at + m, j] = t.column(name).to_numpy()
            at += m
        if self.cfg.shuffle:
            perm = keyed_permutation(n, _key(self.seed, self.cfg.epoch, 2, w))
            sparse = sparse[perm]
            if self.with_dense:
                labels, dense = labels[perm], dense[perm]
        return labels, dense, sparse

    def window(self, w: int) -> tuple[np.ndarray, ...]:
        with self.lock:
            if w in self.cache:
                self.cache.move_to_end(w)
                return self.cache[w]
            data = self._load(w)
            self.cache[w] = data
            while len(self.cache) > CACHED_WINDOWS:
                self.cache.popitem(last=False)
            return data

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, dense, sparse int64) of stream rows [start, stop), copied."""
        parts = []
        w = int(np.searchsorted(self.window_start, start, side="right") - 1)
        at = start
        while at < stop:
            lo = int(self.window_start[w])
            hi = min(stop, int(self.window_start[w + 1]))
            labels, dense, sparse = self.window(w)
            parts.append((labels[at - lo:hi - lo], dense[at - lo:hi - lo], sparse[at - lo:hi - lo]))
            at = hi
            w += 1
        if len(parts) == 1:
            labels, dense, sparse = parts[0]
            return labels.copy(), dense.copy(), sparse.astype(np.int64)
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]).astype(np.int64))


class BatchReader:
    """Random access to this rank's part of global batches: ``reader[i]`` -> Batch."""

    def __init__(self, ds: Dataset, cfg: ReadConfig) -> None:
        self.cfg = cfg
        self.stream = _Stream(ds, cfg, with_dense=True)
        self.local = cfg.batch_size // cfg.world_size

    def __len__(self) -> int:
        return self.stream.total // self.cfg.batch_size

    def epoch_of(self, i: int) -> int:
        return self.cfg.epoch

    def __getitem__(self, i: int) -> Batch:
        i = _check_index(i, len(self), self.cfg)
        start = i * self.cfg.batch_size + self.cfg.rank * self.local
        labels, dense, sparse = self.stream.rows(start, start + self.local)
        return Batch(dense, labels, sparse, i)


class SparseBatches:
    """Random access to the row ids [B, S] of global batches (all ranks' rows, in rank order)."""

    def __init__(self, ds: Dataset, cfg: ReadConfig) -> None:
        self.cfg = cfg
        self.column_tables = ds.column_tables  # the table of each column (bagpipe.keys.source_keys)
        self.stream = _Stream(ds, cfg, with_dense=False)

    def __len__(self) -> int:
        return self.stream.total // self.cfg.batch_size

    def epoch_of(self, i: int) -> int:
        return self.cfg.epoch

    def __getitem__(self, i: int) -> np.ndarray:
        i = _check_index(i, len(self), self.cfg)
        return self.stream.rows(i * self.cfg.batch_size, (i + 1) * self.cfg.batch_size)[2]


def _damage(path: Path, group: int, columns: list[str], exc: Exception) -> str:
    """What is wrong with a row group that failed to read: the first of its columns that fails alone."""
    for name in columns:
        try:
            pq.ParquetFile(path, page_checksum_verification=True).read_row_group(group, columns=[name])
        except (OSError, ValueError, pa.ArrowException) as col_exc:
            return f"{path}: row group {group}, column {name}: damaged ({col_exc})"
    return f"{path}: row group {group}: damaged ({exc})"


def _check_index(i: int, n: int, cfg: ReadConfig) -> int:
    if not isinstance(i, (int, np.integer)):
        raise TypeError(f"batch index must be an integer, got {type(i).__name__}")
    j = int(i) + n if i < 0 else int(i)
    if not 0 <= j < n:
        raise IndexError(f"batch {int(i)} out of range: the {cfg.split} split has {n} full batches "
                         f"of {cfg.batch_size} rows")
    return j
