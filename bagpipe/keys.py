"""Row keys and initial row values.

A row is addressed everywhere (planner, cache, store, wire) by one int64 key
that packs the table index and the row id: ``key = table << ROW_BITS | row``.
Keeping one flat key lets the planner and the store treat all tables alike
with vectorised numpy code.

A row that was never written has an *initial value* that is a pure function
of (seed, table, row, column): a counter-based hash (splitmix64), so any
machine computes the same bits without shared state and without writing the
row to the store.
"""

from __future__ import annotations

import numpy as np

ROW_BITS = 40
MAX_TABLES = 1 << (63 - ROW_BITS)
MAX_ROWS = 1 << ROW_BITS
_ROW_MASK = np.int64(MAX_ROWS - 1)


def make_keys(table: int | np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Pack table index(es) and row ids into int64 keys."""
    rows = np.asarray(rows, dtype=np.int64)
    return (np.asarray(table, dtype=np.int64) << ROW_BITS) | rows


def key_table(keys: np.ndarray) -> np.ndarray:
    return np.asarray(keys, dtype=np.int64) >> ROW_BITS


def key_row(keys: np.ndarray) -> np.ndarray:
    return np.asarray(keys, dtype=np.int64) & _ROW_MASK


def batch_keys(rows: np.ndarray, column_tables: np.ndarray | None = None) -> np.ndarray:
    """A batch's row ids [B, S] as int64 keys [B, S]; column c is of table ``column_tables[c]``
    (default: column t is table t, one-hot). A pad (a negative id: an unused place in a bag) stays -1."""
    rows = np.asarray(rows, dtype=np.int64)
    tables = np.arange(rows.shape[1], dtype=np.int64) if column_tables is None else np.asarray(column_tables)
    keys = make_keys(tables[None, :], rows)
    if column_tables is not None:
        keys[rows < 0] = -1
    return keys


def plan_keys(rows: np.ndarray, column_tables: np.ndarray | None, trainers: int) -> np.ndarray:
    """The keys a planner reads for a batch of row ids [B, S]: ``batch_keys``, with each pad replaced
    by the first real key of the same trainer's share.

    A replaced pad adds no distinct row to any trainer's iteration, so every plan (fetches,
    evictions, capacity) is that of the bags themselves; its read slot is a real slot that the
    trainer's lookup skips (it knows its pads from its own batch). A share with no id at all has
    nothing to stand in for its pads; it is refused (``ValueError``).
    """
    keys = batch_keys(rows, column_tables)
    if column_tables is None:
        return keys
    pads = keys < 0
    if not pads.any():
        return keys
    local = keys.shape[0] // trainers
    for t in range(trainers):
        share, mask = keys[t * local:(t + 1) * local], pads[t * local:(t + 1) * local]
        if mask.any():
            real = share[~mask]
            if not len(real):
                raise ValueError(f"trainer {t}'s share of a batch has no ids in any table")
            share[mask] = real[0]
    return keys


ABSENT = -1  # in a partition's view of a batch: a cell whose key another partition plans (oracle.partitions)


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """The partition that plans each key: ``splitmix64(key) % partitions`` (int64, same shape).

    A hash, not the key itself, so that every partition gets a like share of the hot rows
    whatever the tables' sizes and the rows' numbering."""
    keys = np.asarray(keys, dtype=np.int64)
    if partitions == 1:
        return np.zeros(keys.shape, np.int64)
    with np.errstate(over="ignore"):
        return (splitmix64(keys.view(np.uint64)) % np.uint64(partitions)).astype(np.int64)


def distinct_rows_per_partition(rows: np.ndarray, trainers: int, partitions: int,
                                column_tables: np.ndarray | None = None) -> np.ndarray:
    """How many distinct rows each trainer reads of each partition in one global batch of row ids [B, S]:
    int64 [trainers, partitions]. Partition p's share of the cache must hold the largest of column p."""
    keys = batch_keys(rows, column_tables)
    out = np.zeros((trainers, partitions), np.int64)
    for t in range(trainers):
        part = trainer_keys(keys, t, trainers)
        uniq = np.unique(part[part >= 0])
        out[t] = np.bincount(partition_of(uniq, partitions), minlength=partitions)
    return out


def trainer_keys(keys: np.ndarray, trainer: int, trainers: int) -> np.ndarray:
    """Trainer ``trainer``'s contiguous share of a global batch's keys (rank r of W reads rows
    [r*B/W, (r+1)*B/W), as ``bagpipe.dataset`` slices them)."""
    local = keys.shape[0] // trainers
    return keys[trainer * local:(trainer + 1) * local]


def source_keys(batches, i: int, trainers: int) -> np.ndarray:
    """``plan_keys`` of batch i of a batch source; a source of multi-hot data (``bagpipe.dataset``)
    says which table each column is (``column_tables``), any other source is one-hot. A source
    that says ``keys_planned`` (a partition's view, ``oracle.partitions``) gives such keys already,
    with ``ABSENT`` where another partition plans the cell."""
    if getattr(batches, "keys_planned", False):
        return np.asarray(batches[i], dtype=np.int64)
    return plan_keys(np.asarray(batches[i], dtype=np.int64), getattr(batches, "column_tables", None), trainers)


def distinct_rows_per_trainer(rows: np.ndarray, trainers: int, column_tables: np.ndarray | None = None) -> np.ndarray:
    """How many distinct rows each trainer reads in one global batch of row ids [B, S]: int64 [trainers].

    The capacity a policy held to ``cache_rows`` needs is the largest of these over the run.
    """
    keys = batch_keys(rows, column_tables)
    out = []
    for t in range(trainers):
        part = trainer_keys(keys, t, trainers)
        out.append(len(np.unique(part[part >= 0])))
    return np.array(out, np.int64)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised over uint64 (wrapping arithmetic)."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stable_hash(keys: np.ndarray, salt: int = 0) -> np.ndarray:
    """A hash of keys that is the same on every machine and every run."""
    with np.errstate(over="ignore"):
        return splitmix64(np.asarray(keys, dtype=np.int64).view(np.uint64) ^ splitmix64(np.uint64(salt)))


def init_bound(num_embeddings: int) -> float:
    """Half-width of the uniform initial distribution: torchrec's default, sqrt(1/n)."""
    return float(np.sqrt(1.0 / max(1, num_embeddings)))


def initial_rows(
    keys: np.ndarray, dim: int, state_width: int, seed: int, table_sizes: np.ndarray
) -> np.ndarray:
    """Initial values of rows never written: float32 [n, dim + state_width].

    Embedding columns are uniform in [-b, b] with b = sqrt(1/num_embeddings)
    of the row's table; optimizer state columns start at zero.
    """
    keys = np.asarray(keys, dtype=np.int64)
    n = keys.shape[0]
    out = np.zeros((n, dim + state_width), dtype=np.float32)
    if n == 0:
        return out
    bounds = np.sqrt(1.0 / np.maximum(1, np.asarray(table_sizes, dtype=np.float64)))[key_table(keys)]
    with np.errstate(over="ignore"):
        base = splitmix64(keys.view(np.uint64) ^ splitmix64(np.uint64(seed)))
        cols = np.arange(dim, dtype=np.uint64) * np.uint64(0x632BE59BD9B4E019)
        bits = splitmix64(base[:, None] + cols[None, :])
    # 24 high bits -> a float in [0, 1) exactly representable in float32.
    unit = (bits >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    out[:, :dim] = ((2.0 * unit - 1.0) * bounds[:, None]).astype(np.float32)
    return out
