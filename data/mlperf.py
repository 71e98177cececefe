"""MLPerf DLRM-DCNv2's materialized multi-hot Criteo files to a prepared multi-hot dataset.

    bagpipe data prepare --format mlperf-npz --input DIR/day_0_sparse_multi_hot.npz ... --out OUT
        [--num-embeddings mlperf|N1,N2,...] [--eval-fraction F] [--rows-per-group R] [--replace]

MLPerf's reference (``materialize_synthetic_multihot_dataset.py`` over
torchrec's ``InMemoryBinaryCriteoIterDataPipe`` files) leaves three files per
day, side by side:

- ``day_N_sparse_multi_hot.npz``: one array per table, named ``"0"`` ..
  ``"25"``, each ``[rows, bag_t]`` of integer ids (every sample's bag full);
- ``day_N_dense.npy``: float32 ``[rows, 13]``, already transformed by
  torchrec (``log(x - min + 2)``), taken as given;
- ``day_N_labels.npy``: int32 ``[rows, 1]`` (or ``[rows]``), 0 or 1.

Every ``--input`` names a day's ``.npz``; its two ``.npy`` are found beside it.
Days are read in the order given, in chunks of ``--rows-per-group`` rows (the
``.npz`` members streamed, never loaded whole), so memory stays bounded
whatever a day holds. The last ``--eval-fraction`` of all rows form the eval
split, as ``bagpipe data prepare`` does for text. Ids are kept as they are:
``--num-embeddings`` gives each table's size (``mlperf``: the sizes MLPerf
trains with, rows capped at 40M); without it, one extra pass finds each
table's largest id. An id outside its table, a label other than 0 or 1, a
dense value that is not finite, or arrays of mismatched rows is refused,
naming the file, the array and the row.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bagpipe.dataset import PARQUET_WRITE_OPTIONS, content_hash, file_schema
from bagpipe.progress import Progress

log = logging.getLogger("bagpipe.data.prepare")

FORMAT = "mlperf-npz"
SPARSE_SUFFIX = "_sparse_multi_hot.npz"
# MLPerf DLRM-DCNv2's table sizes (num_embeddings_per_feature: Criteo 1TB, capped at 40M rows).
MLPERF_NUM_EMBEDDINGS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10, 2209, 11938, 155, 4,
    976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)


class MlperfError(ValueError):
    """Bad input or options; the message names the file, the array and the row at fault."""


@dataclass(frozen=True)
class MlperfConfig:
    """What the conversion needs. ``inputs``/``out``/``replace`` as ``data.prepare.PrepareConfig``'s,
    so that its ``check_out`` guards ``out`` the same way."""

    inputs: tuple[Path, ...]
    out: Path
    num_embeddings: tuple[int, ...] | None = None  # None: each table's largest id + 1
    eval_fraction: float = 0.05
    rows_per_group: int = 65536
    replace: bool = False

    def __post_init__(self) -> None:
        if not self.inputs:
            raise MlperfError("--input: give at least one day_N_sparse_multi_hot.npz")
        if not 0 <= self.eval_fraction < 1:
            raise MlperfError(f"--eval-fraction: must be in [0, 1), got {self.eval_fraction}")
        if self.rows_per_group < 1:
            raise MlperfError(f"--rows-per-group: must be >= 1, got {self.rows_per_group}")
        if self.num_embeddings is not None and min(self.num_embeddings, default=0) < 1:
            raise MlperfError(f"--num-embeddings: every size must be >= 1, got {list(self.num_embeddings)}")


def parse_num_embeddings(text: str | None) -> tuple[int, ...] | None:
    """``mlperf``, comma-separated sizes, or None (find them)."""
    if text is None:
        return None
    if text == "mlperf":
        return MLPERF_NUM_EMBEDDINGS
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise MlperfError(f"--num-embeddings: {text!r} is not 'mlperf' or comma-separated integers") from None


class _NpyStream:
    """Rows of one ``.npy`` read in order from an open binary file (a member of a zip, or a file)."""

    def __init__(self, f: BinaryIO, where: str) -> None:
        self.f, self.where = f, where
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as exc:
            raise MlperfError(f"{where}: not a .npy array ({exc})") from None
        if fortran and len(shape) > 1:
            raise MlperfError(f"{where}: Fortran-ordered arrays cannot be streamed; save it in C order")
        if dtype.hasobject:
            raise MlperfError(f"{where}: holds Python objects; only numeric arrays are read")
        if len(shape) not in (1, 2):
            raise MlperfError(f"{where}: expected a [rows] or [rows, columns] array, got shape {shape}")
        self.shape, self.dtype = tuple(shape), dtype
        self.rows = int(shape[0])
        self.width = int(shape[1]) if len(shape) == 2 else 1
        self.done = 0

    def read(self, n: int) -> np.ndarray:
        """The next ``n`` rows as [n, width]."""
        want = n * self.width * self.dtype.itemsize
        data = self.f.read(want)
        if len(data) != want:
            raise MlperfError(f"{self.where}: ends at row {self.done + len(data) // max(self.width * self.dtype.itemsize, 1)} "
                              f"of the {self.rows} its header promises (truncated)")
        self.done += n
        return np.frombuffer(data, self.dtype).reshape(n, self.width)


@dataclass
class _Day:
    """One day's three files, opened for streaming."""

    sparse: Path
    dense: Path
    labels: Path

    @classmethod
    def of(cls, npz: Path) -> "_Day":
        if not npz.name.endswith(SPARSE_SUFFIX):
            raise MlperfError(f"--input {npz}: expected a file named day_N{SPARSE_SUFFIX}")
        if not npz.is_file():
            raise MlperfError(f"--input {npz}: no such file")
        stem = npz.name[:-len(SPARSE_SUFFIX)]
        day = cls(npz, npz.with_name(f"{stem}_dense.npy"), npz.with_name(f"{stem}_labels.npy"))
        for p in (day.dense, day.labels):
            if not p.is_file():
                raise MlperfError(f"--input {npz}: {p.name} is missing beside it (MLPerf's layout keeps a "
                                  "day's dense, labels and sparse files together)")
        return day

    def open(self) -> "_OpenDay":
        return _OpenDay(self)


class _OpenDay:
    def __init__(self, day: _Day) -> None:
        self.day = day
        self._files: list = []
        try:
            self.zip = zipfile.ZipFile(day.sparse)
        except (zipfile.BadZipFile, OSError) as exc:
            raise MlperfError(f"{day.sparse}: not a readable .npz ({exc})") from None
        self._files.append(self.zip)
        names = {n[:-4] for n in self.zip.namelist() if n.endswith(".npy")}
        tables = 0
        while str(tables) in names:
            tables += 1
        if not tables or names != {str(t) for t in range(tables)}:
            raise MlperfError(f"{day.sparse}: expected arrays named 0..T-1 (one per table), got {sorted(names)[:8]}")
        self.sparse = []
        for t in range(tables):
            member = self.zip.open(f"{t}.npy")
            self._files.append(member)
            s = _NpyStream(member, f"{day.sparse} array '{t}'")
            if s.dtype.kind not in "iu":
                raise MlperfError(f"{s.where}: ids must be integers, got {s.dtype}")
            self.sparse.append(s)
        self.dense = self._npy(day.dense)
        self.labels = self._npy(day.labels)
        if self.dense.dtype.kind != "f":
            raise MlperfError(f"{day.dense}: dense features must be floats, got {self.dense.dtype}")
        if self.labels.width != 1 or self.labels.dtype.kind not in "iuf":
            raise MlperfError(f"{day.labels}: expected [rows] or [rows, 1] numeric labels, got shape "
                              f"{self.labels.shape} of {self.labels.dtype}")
        self.rows = self.labels.rows
        for s in [self.dense, *self.sparse]:
            if s.rows != self.rows:
                raise MlperfError(f"{s.where}: {s.rows} rows, but {day.labels.name} has {self.rows}")

    def _npy(self, path: Path) -> _NpyStream:
        f = open(path, "rb")
        self._files.append(f)
        return _NpyStream(f, str(path))

    @property
    def bags(self) -> list[int]:
        return [s.width for s in self.sparse]

    def close(self) -> None:
        for f in reversed(self._files):
            f.close()

    def __enter__(self) -> "_OpenDay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Chunk:
    first_row: int  # within its day
    labels: np.ndarray  # float32 [n]
    dense: np.ndarray  # float32 [n, D]
    ids: list[np.ndarray]  # per table [n, bag_t]


def _chunks(day: _OpenDay, rows: int, sizes: tuple[int, ...] | None) -> Iterator[_Chunk]:
    """A day's rows in chunks, checked: labels 0/1, dense finite, ids inside their tables."""
    first = 0
    while first < day.rows:
        n = min(rows, day.rows - first)
        labels = day.labels.read(n)[:, 0]
        bad = np.flatnonzero((labels != 0) & (labels != 1))
        if len(bad):
            raise MlperfError(f"{day.day.labels}: row {first + bad[0]}: label {labels[bad[0]].item()!r} is not 0 or 1")
        dense = day.dense.read(n)
        bad_rows = np.flatnonzero(~np.isfinite(dense).all(axis=1))
        if len(bad_rows):
            raise MlperfError(f"{day.day.dense}: row {first + bad_rows[0]}: a dense value is not finite "
                              f"({dense[bad_rows[0]].tolist()})")
        ids = []
        for t, s in enumerate(day.sparse):
            a = s.read(n)
            limit = sizes[t] if sizes is not None else np.iinfo(np.int64).max
            out = (a < 0) | (a >= limit) if a.dtype.kind == "i" else a >= limit
            if out.any():
                r, c = np.argwhere(out)[0]
                size = f"table {t} has {limit} rows" if sizes is not None else "ids must be >= 0"
                raise MlperfError(f"{s.where}: row {first + r}, position {c}: id {int(a[r, c])} is outside the "
                                  f"table ({size}; see --num-embeddings)")
            ids.append(a.astype(np.int64))
        yield _Chunk(first, labels.astype(np.float32), np.ascontiguousarray(dense, np.float32), ids)
        first += n


def _bag_column(ids: np.ndarray) -> pa.Array:
    """[n, bag] ids as a list<int64> column (every bag full, as MLPerf's files hold them)."""
    n, bag = ids.shape
    offsets = pa.array(np.arange(0, (n + 1) * bag, bag, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1)))


def _layout(days: list[_Day]) -> tuple[list[int], int, list[int]]:
    """(bags per table, dense width, rows per day), the same in every day or refused."""
    bags = dense = None
    rows = []
    for d in days:
        with d.open() as o:
            if bags is None:
                bags, dense = o.bags, o.dense.width
            elif o.bags != bags or o.dense.width != dense:
                raise MlperfError(f"{d.sparse}: bags {o.bags} and {o.dense.width} dense features, but "
                                  f"{days[0].sparse.name} has bags {bags} and {dense}")
            rows.append(o.rows)
    assert bags is not None and dense is not None
    return bags, dense, rows


def _largest_ids(days: list[_Day], rows: int, tables: int) -> list[int]:
    top = [-1] * tables
    for d in days:
        with d.open() as o:
            for ch in _chunks(o, rows, None):
                top = [max(m, int(a.max(initial=-1))) for m, a in zip(top, ch.ids)]
    return top


def _check_out(cfg: MlperfConfig) -> None:
    """The same guard on ``--out`` as for text inputs (it reads inputs, out and replace)."""
    from data.prepare import PrepareError, check_out

    try:
        check_out(cfg)  # type: ignore[arg-type]
    except PrepareError as exc:
        raise MlperfError(str(exc)) from None


def convert(cfg: MlperfConfig) -> dict:
    """Write the prepared dataset at ``cfg.out`` (atomically); returns its meta."""
    days = [_Day.of(Path(p)) for p in cfg.inputs]
    _check_out(cfg)
    started = time.perf_counter()
    bags, num_dense, day_rows = _layout(days)
    tables = len(bags)
    total = sum(day_rows)
    if total == 0:
        raise MlperfError(f"--input: the {len(days)} day(s) hold no rows")
    if cfg.num_embeddings is not None and len(cfg.num_embeddings) != tables:
        raise MlperfError(f"--num-embeddings: {len(cfg.num_embeddings)} sizes for the files' {tables} tables")
    sizes = cfg.num_embeddings
    if sizes is None:
        sizes = tuple(max(m + 1, 1) for m in _largest_ids(days, cfg.rows_per_group, tables))
        log.info("table sizes from the largest ids: %s", list(sizes))
    first_eval = total - int(total * cfg.eval_fraction)
    names = [f"cat_{t}" for t in range(tables)]
    schema = file_schema(num_dense, names, bags)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.out.parent / f".{cfg.out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    files: dict[str, list[str]] = {"train": [], "eval": []}
    counts = {"train": 0, "eval": 0}
    writers: dict[str, pq.ParquetWriter | None] = {"train": None, "eval": None}
    progress = Progress("prepare", total, log)
    try:
        for split in files:
            (tmp / split).mkdir(parents=True)
        base = 0
        for d in days:
            with d.open() as o:
                for ch in _chunks(o, cfg.rows_per_group, sizes):
                    n = len(ch.labels)
                    cols = [pa.array(ch.labels)] + [pa.array(ch.dense[:, j]) for j in range(num_dense)]
                    cols += [pa.array(a[:, 0]) if bag == 1 else _bag_column(a) for a, bag in zip(ch.ids, bags)]
                    table = pa.table(cols, schema=schema)
                    cut = min(max(first_eval - (base + ch.first_row), 0), n)
                    for split, part in (("train", table.slice(0, cut)), ("eval", table.slice(cut))):
                        if part.num_rows:
                            w = writers[split]
                            if w is None:
                                name = f"{split}/part-{len(files[split]):05d}.parquet"
                                files[split].append(name)
                                w = writers[split] = pq.ParquetWriter(tmp / name, schema, **PARQUET_WRITE_OPTIONS)
                            w.write_table(part, row_group_size=cfg.rows_per_group)
                            counts[split] += part.num_rows
                    progress.add(n)
            base += o.rows
            for split, w in writers.items():  # one part file per day and split
                if w is not None:
                    w.close()
                    writers[split] = None
        meta = {
            "version": 1,
            "format": FORMAT,
            "rows": counts["train"],
            "eval_rows": counts["eval"],
            "bad_rows": 0,
            "bad_row_examples": [],
            "num_dense": num_dense,
            "dense": "as MLPerf's files hold them (torchrec's log(x - min + 2) of I1..I13)",
            "tables": [{"name": n, "num_embeddings": int(s), "bag": int(b)} for n, s, b in zip(names, sizes, bags)],
            "files": files,
            "rows_per_group": cfg.rows_per_group,
            "page_checksums": PARQUET_WRITE_OPTIONS["write_page_checksum"],
            "params": {"num_embeddings": "given" if cfg.num_embeddings is not None else "largest id + 1",
                       "eval_fraction": cfg.eval_fraction, "eval_split": "last rows",
                       "rows_per_group": cfg.rows_per_group},
            "inputs": [{"path": str(d.sparse.resolve()), "bytes": d.sparse.stat().st_size} for d in days],
            "content_hash": content_hash(tmp, files["train"] + files["eval"]),
            "created_by": "bagpipe data prepare",
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        _check_out(cfg)  # again: nothing may have appeared there meanwhile
        from data.prepare import replace_dir
        replace_dir(tmp, cfg.out)
    except BaseException:
        for w in writers.values():
            if w is not None:
                w.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        progress.close()
    log.info("wrote %d train and %d eval rows (%d ids per sample) to %s in %.1f s", counts["train"],
             counts["eval"], sum(bags), cfg.out, time.perf_counter() - started)
    return meta


def write_day(directory: Path, day: int, labels: np.ndarray, dense: np.ndarray, ids: list[np.ndarray]) -> Path:
    """Write one day in MLPerf's layout (for tests and small examples): returns the ``.npz``."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / f"day_{day}_labels.npy", labels.astype(np.int32).reshape(-1, 1))
    np.save(directory / f"day_{day}_dense.npy", dense.astype(np.float32))
    npz = directory / f"day_{day}{SPARSE_SUFFIX}"
    np.savez(npz, **{str(t): a for t, a in enumerate(ids)})
    return npz
