"""Synthetic Criteo and Avazu files in the exact raw formats.

    bagpipe data synth --format criteo|avazu --rows N --out DIR [--seed S] [--files K] [--gzip]

Per-feature cardinalities and missing rates follow the published statistics
of the real data sets (``data.formats``, cited in docs/data.md). Categorical
values are drawn from a Zipf law over each feature's vocabulary (rank 0 the
most frequent) and written as 8-digit hex through a fixed per-feature
bijection, so ids look like the real hashed ones and are not sequential.
Labels come from a hidden sparse logistic model over those values (and a few
dense features), so a model that learns beats AUC 0.5 and one that does not
stays there.

Everything is a pure function of (format, rows, seed): rows are generated in
fixed chunks of the global row index, each from its own seeded generator, and
``--files`` only cuts that one stream, so ``day_0`` + ``day_1`` equals the
``train.txt`` of the same rows and seed.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from bagpipe.keys import splitmix64
from bagpipe.log import init_logger
from bagpipe.metrics import auc
from bagpipe.progress import Progress
from data import formats as F

log = logging.getLogger("bagpipe.data.synth")

# Rows per generated chunk. Part of the output's definition (each chunk has its
# own generator), so changing it changes the files: keep it fixed.
CHUNK_ROWS = 65536
# The skew figure and the hidden model's AUC are measured on the first rows, up to this many.
SAMPLE_ROWS = 1_000_000

# Zipf exponent of categorical values over each vocabulary; 1.25 puts about 90% of
# the lookups of a 1M-row Criteo sample on the top 1% of its distinct rows.
ZIPF_EXPONENT = 1.25

# Hidden model. Categorical values carry weights with probability WEIGHT_DENSITY
# (a hash of feature and value decides), drawn ~ N(0, WEIGHT_SCALE^2); the
# intercepts put the base CTR near the real data's (0.256 Criteo, 0.170 Avazu).
WEIGHT_DENSITY = 0.5
CRITEO_WEIGHT_SCALE = 0.38
CRITEO_INTERCEPT = -0.69
AVAZU_WEIGHT_SCALE = 0.52
AVAZU_INTERCEPT = -2.18
# Weights of log(1 + I_j) - its typical value, for the dense features that matter.
CRITEO_DENSE_WEIGHTS = {0: 0.25, 2: -0.15, 5: 0.2, 7: -0.25, 10: 0.3, 12: 0.15}

# Integer features I1..I13: median, log-scale spread and maximum, after the
# real data's (counts, mostly small, with a long tail).
_CRITEO_DENSE_SHAPE = (
    (1, 1.2, 5775), (3, 2.0, 257675), (6, 1.3, 65535), (4, 0.9, 969), (2800, 1.6, 23159456),
    (33, 1.6, 431037), (3, 1.5, 56311), (8, 0.9, 6047), (40, 1.3, 29019), (1, 0.5, 11),
    (1, 1.0, 231), (0, 1.0, 4008), (4, 1.1, 7393),
)
# I2 takes small negative values in the real data: value -> probability.
_CRITEO_I2_NEGATIVE = ((-1, 0.02), (-2, 0.002), (-3, 0.0005))

# Avazu: probability of each column's most frequent value (the real data has a
# dominant value in most columns, e.g. device_id a99f214a in 82.5% of rows);
# the rest is Zipf over the remaining vocabulary.
_AVAZU_HEAD = {
    "C1": 0.919, "banner_pos": 0.72, "site_id": 0.361, "site_domain": 0.374, "site_category": 0.409,
    "app_id": 0.639, "app_domain": 0.674, "app_category": 0.647, "device_id": 0.825,
    "device_ip": 0.005, "device_model": 0.061, "device_type": 0.923, "device_conn_type": 0.863,
    "C14": 0.02, "C15": 0.933, "C16": 0.943, "C17": 0.1, "C18": 0.42, "C19": 0.3, "C20": 0.47, "C21": 0.25,
}
# Values of Avazu's integer columns: the real sets where they are small, else a
# fixed draw of the published number of distinct values from the real range.
_AVAZU_INT_VALUES: dict[str, tuple[int, ...] | tuple[int, int]] = {
    "C1": (1005, 1002, 1010, 1012, 1007, 1001, 1008),
    "banner_pos": (0, 1, 7, 2, 4, 5, 3),
    "device_type": (1, 0, 4, 5, 2),
    "device_conn_type": (0, 2, 3, 5),
    "C15": (320, 300, 216, 728, 120, 1024, 480, 768),
    "C16": (50, 250, 36, 480, 90, 20, 768, 320, 1024),
    "C18": (0, 3, 2, 1),
    "C14": (375, 24053), "C17": (112, 2759), "C19": (33, 1960), "C20": (100000, 100249), "C21": (1, 256),
}
# Relative traffic by hour of day (Avazu has more impressions in the day than at night).
_AVAZU_DIURNAL = 0.55 + 0.45 * np.sin(np.pi * (np.arange(24) - 2) / 24.0).clip(0) ** 2
# Hour-of-day effect on the logit (learnable from the derived dense features).
_AVAZU_HOUR_WEIGHT = 0.4

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


@dataclass(frozen=True)
class SynthConfig:
    """What to generate: format, size, seed and file layout."""

    format: str
    rows: int
    out: Path
    seed: int = 0
    files: int = 1
    gzip: bool = False

    def __post_init__(self) -> None:
        if self.format not in F.FORMATS:
            raise ValueError(f"format: {self.format!r} is not one of {', '.join(F.FORMATS)}")
        if self.rows < 1:
            raise ValueError(f"rows: must be >= 1, got {self.rows}")
        if not 1 <= self.files <= self.rows:
            raise ValueError(f"files: must be in [1, rows={self.rows}], got {self.files}")
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")


@dataclass
class SynthReport:
    files: list[Path]
    rows: int
    ctr: float
    sample_rows: int
    top1pct_share: float  # share of lookups on the top 1% of distinct (feature, value) rows
    bayes_auc: float  # AUC of the hidden model's own probabilities on the sample


def file_names(fmt: str, files: int, gz: bool) -> list[str]:
    """Names of the K files, after the real data sets' own."""
    if fmt == "criteo":
        names = ["train.txt"] if files == 1 else [f"day_{k}" for k in range(files)]
    else:
        names = ["train.csv"] if files == 1 else [f"train_{k}.csv" for k in range(files)]
    return [n + ".gz" for n in names] if gz else names


# ------------------------------------------------------------------ sampling


def zipf_ranks(rng: np.random.Generator, n: int, vocab: int, s: float = ZIPF_EXPONENT) -> np.ndarray:
    """n ranks in [0, vocab) with P(rank k) ~ (k + 1)^-s.

    Exact (inverse CDF by search) for small vocabularies; for large ones the
    continuous power law's inverse CDF, floored, which needs no table.
    """
    u = rng.random(n)
    if vocab <= 65536:
        cdf = np.cumsum(np.arange(1, vocab + 1, dtype=np.float64) ** -s)
        return np.minimum(np.searchsorted(cdf / cdf[-1], u, side="right"), vocab - 1)
    a = (vocab + 1.0) ** (1.0 - s)
    x = (1.0 + u * (a - 1.0)) ** (1.0 / (1.0 - s))
    return np.minimum(x.astype(np.int64) - 1, vocab - 1)


def scramble32(ranks: np.ndarray, feature: int) -> np.ndarray:
    """A fixed bijection of uint32 per feature: rank -> the value written as hex.

    Every step (add, xorshift, multiply by an odd constant, mod 2^32) is
    invertible, so distinct ranks give distinct values.
    """
    x = ranks.astype(np.uint32) + np.uint32((0x9E3779B9 * (feature + 1)) & 0xFFFFFFFF)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def value_weights(ranks: np.ndarray, feature: int, scale: float, tag: int) -> np.ndarray:
    """Hidden-model weight of each (feature, rank): a hash decides if it has one and its size."""
    with np.errstate(over="ignore"):
        h = splitmix64(ranks.astype(np.int64).view(np.uint64) ^ splitmix64(np.uint64((tag << 8) + feature)))
    # Four 16-bit uniforms summed: approximately normal with unit variance.
    parts = [((h >> np.uint64(16 * i)) & np.uint64(0xFFFF)).astype(np.float64) for i in range(4)]
    normal = (sum(parts) / 65536.0 - 2.0) * np.sqrt(3.0)
    keep = (splitmix64(h) >> np.uint64(11)).astype(np.float64) / float(1 << 53) < WEIGHT_DENSITY
    return np.where(keep, scale * normal, 0.0)


def _rng(seed: int, fmt: str, chunk: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, F.FORMATS.index(fmt), chunk]))


@dataclass
class Chunk:
    """Rows [start, start + n) of the stream, before they are written as text."""

    labels: np.ndarray  # int8 [n]
    prob: np.ndarray  # hidden model's click probability [n]
    ranks: np.ndarray  # int64 [n, T]: value rank per categorical feature, -1 missing
    fields: dict = field(default_factory=dict)  # format-specific columns


def criteo_chunk(seed: int, chunk: int, n: int) -> Chunk:
    rng = _rng(seed, "criteo", chunk)
    dense = np.empty((n, F.CRITEO_NUM_DENSE), dtype=np.int64)
    dense_missing = np.empty((n, F.CRITEO_NUM_DENSE), dtype=bool)
    logit = np.full(n, CRITEO_INTERCEPT)
    for j, (median, spread, top) in enumerate(_CRITEO_DENSE_SHAPE):
        v = np.expm1(np.log1p(median) + spread * rng.standard_normal(n)).clip(0, top).astype(np.int64)
        if j == 1:
            u = rng.random(n)
            edge = 0.0
            for value, p in _CRITEO_I2_NEGATIVE:
                v[(u >= edge) & (u < edge + p)] = value
                edge += p
        dense[:, j] = v
        dense_missing[:, j] = rng.random(n) < F.CRITEO_DENSE_MISSING[j]
        if j in CRITEO_DENSE_WEIGHTS:
            centred = np.log1p(np.maximum(v, 0)) - np.log1p(median)
            logit += np.where(dense_missing[:, j], 0.0, CRITEO_DENSE_WEIGHTS[j] * centred)
    ranks = np.empty((n, F.CRITEO_NUM_CAT), dtype=np.int64)
    for f, vocab in enumerate(F.CRITEO_KAGGLE_CARDINALITIES):
        ranks[:, f] = zipf_ranks(rng, n, vocab)
    for members, rate in F.CRITEO_CAT_MISSING_GROUPS:
        gone = rng.random(n) < rate
        ranks[np.ix_(gone, members)] = -1
    for f in range(F.CRITEO_NUM_CAT):
        logit += value_weights(ranks[:, f], f, CRITEO_WEIGHT_SCALE, 1)
    prob = 1.0 / (1.0 + np.exp(-logit))
    labels = (rng.random(n) < prob).astype(np.int8)
    return Chunk(labels, prob, ranks, {"dense": dense, "dense_missing": dense_missing})


def _avazu_int_tables() -> dict[str, np.ndarray]:
    """Values of the integer columns by rank (fixed: independent of the seed)."""
    tables = {}
    for c, spec in _AVAZU_INT_VALUES.items():
        card = F.AVAZU_CARDINALITIES[c]
        if len(spec) == card:
            tables[c] = np.array(spec, dtype=np.int64)
            continue
        lo, hi = spec
        rng = np.random.Generator(np.random.PCG64([0xA7A2, F.AVAZU_HEADER.index(c)]))
        values = rng.permutation(rng.choice(np.arange(lo, hi), size=card, replace=False))
        if c == "C20":
            values[0] = -1  # C20's most frequent value is -1 in the real data
        tables[c] = values
    return tables


def avazu_hours(start: int, n: int, total: int) -> np.ndarray:
    """Hour index (0..239) of rows [start, start + n) of ``total``: chronological, diurnal volume."""
    weights = np.tile(_AVAZU_DIURNAL, F.AVAZU_DAYS)
    cdf = np.cumsum(weights) / weights.sum()
    pos = (np.arange(start, start + n, dtype=np.float64) + 0.5) / total
    return np.minimum(np.searchsorted(cdf, pos, side="right"), len(weights) - 1)


def avazu_chunk(seed: int, chunk: int, start: int, n: int, total: int) -> Chunk:
    rng = _rng(seed, "avazu", chunk)
    hours = avazu_hours(start, n, total)
    hod = hours % 24
    # Clicks peak in the evening: a smooth effect a model can learn from hour of day.
    logit = AVAZU_INTERCEPT + _AVAZU_HOUR_WEIGHT * np.cos(2 * np.pi * (hod - 20) / 24.0)
    ranks = np.empty((n, len(F.AVAZU_CAT_COLUMNS)), dtype=np.int64)
    for f, c in enumerate(F.AVAZU_CAT_COLUMNS):
        vocab = F.AVAZU_CARDINALITIES[c]
        r = 1 + zipf_ranks(rng, n, vocab - 1)
        r[rng.random(n) < _AVAZU_HEAD[c]] = 0
        ranks[:, f] = r
        logit += value_weights(r, f, AVAZU_WEIGHT_SCALE, 2)
    prob = 1.0 / (1.0 + np.exp(-logit))
    labels = (rng.random(n) < prob).astype(np.int8)
    with np.errstate(over="ignore"):
        salt = splitmix64(np.uint64(seed) ^ np.uint64(0xA7A2D1))
        ids = splitmix64(np.arange(start, start + n, dtype=np.uint64) ^ salt)
    return Chunk(labels, prob, ranks, {"hours": hours, "ids": ids})


# ------------------------------------------------------------------ rendering


def render_uint(v: np.ndarray, width: int) -> np.ndarray:
    """Decimal digits of non-negative integers, right-aligned in ``width`` bytes, 0 = padding."""
    v = np.asarray(v, dtype=np.uint64)
    out = np.zeros((len(v), width), dtype=np.uint8)
    rest = v.copy()
    for k in range(width - 1, -1, -1):
        digit = (rest % np.uint64(10)).astype(np.uint8) + ord("0")
        # the units digit is always written; higher ones only while the number lasts
        out[:, k] = digit if k == width - 1 else np.where(rest > 0, digit, 0)
        rest //= np.uint64(10)
    return out


def render_int(v: np.ndarray, missing: np.ndarray | None = None) -> np.ndarray:
    """Signed decimal integers right-aligned (0 = padding); missing ones empty."""
    v = np.asarray(v, dtype=np.int64)
    mag = np.abs(v).astype(np.uint64)
    width = len(str(int(mag.max()))) + 1 if len(v) else 1
    out = render_uint(mag, width)
    neg = np.flatnonzero(v < 0)
    if len(neg):
        # the sign goes just left of the first digit
        first = np.argmax(out[neg] != 0, axis=1)
        out[neg, first - 1] = ord("-")
    if missing is not None:
        out[missing] = 0
    return out


def render_hex(v: np.ndarray, missing: np.ndarray | None = None) -> np.ndarray:
    """uint32 values as 8 lowercase hex digits; missing ones empty."""
    shifts = np.arange(28, -1, -4, dtype=np.uint32)
    out = _HEX[(v.astype(np.uint32)[:, None] >> shifts[None, :]) & np.uint32(15)]
    if missing is not None:
        out[missing] = 0
    return out


def join_lines(columns: list[np.ndarray], sep: int) -> bytes:
    """Lines from per-column byte blocks: separator between columns, newline after each row."""
    n = columns[0].shape[0]
    parts = []
    for i, block in enumerate(columns):
        parts.append(block)
        parts.append(np.full((n, 1), sep if i < len(columns) - 1 else ord("\n"), dtype=np.uint8))
    flat = np.concatenate(parts, axis=1).ravel()
    return flat[flat != 0].tobytes()


def criteo_text(c: Chunk) -> bytes:
    cols = [render_int(c.labels)]
    for j in range(F.CRITEO_NUM_DENSE):
        cols.append(render_int(c.fields["dense"][:, j], c.fields["dense_missing"][:, j]))
    for f in range(F.CRITEO_NUM_CAT):
        r = c.ranks[:, f]
        cols.append(render_hex(scramble32(np.maximum(r, 0), f), r < 0))
    return join_lines(cols, ord("\t"))


def avazu_text(c: Chunk, int_tables: dict[str, np.ndarray]) -> bytes:
    hours = c.fields["hours"]
    day, hod = hours // 24, hours % 24
    y, m, d = F.AVAZU_FIRST_DAY
    stamp = (y % 100) * 1_000_000 + m * 10_000 + (d + day) * 100 + hod
    cols = [render_uint(c.fields["ids"], 20), render_int(c.labels), render_int(stamp)]
    for f, name in enumerate(F.AVAZU_CAT_COLUMNS):
        r = c.ranks[:, f]
        if name in F.AVAZU_HEX_COLUMNS:
            cols.append(render_hex(scramble32(r, f + 100)))
        else:
            cols.append(render_int(int_tables[name][r]))
    return join_lines(cols, ord(","))


# ------------------------------------------------------------------ measuring


def top_share(per_feature_values: list[np.ndarray], fraction: float = 0.01) -> float:
    """Share of lookups that fall on the top ``fraction`` of distinct (feature, value) rows."""
    counts = np.concatenate([np.unique(v, return_counts=True)[1] for v in per_feature_values])
    counts = np.sort(counts)[::-1]
    top = max(1, int(np.ceil(fraction * len(counts))))
    return float(counts[:top].sum() / counts.sum())


# ------------------------------------------------------------------ writing


class _Output:
    """The K output files, each written under a temporary name and renamed once all are complete."""

    def __init__(self, cfg: SynthConfig, header: bytes | None) -> None:
        self.cfg, self.header = cfg, header
        self.names = file_names(cfg.format, cfg.files, cfg.gzip)
        self.bounds = [k * cfg.rows // cfg.files for k in range(cfg.files + 1)]  # first row of each file
        self.tmp = [cfg.out / f".{n}.tmp{os.getpid()}" for n in self.names]
        self.current = -1
        self.raw: BinaryIO | None = None
        self.stream: BinaryIO | None = None

    def write(self, start: int, text: bytes) -> None:
        """Write the lines of rows start, start+1, ... (``text``) into the files they belong to."""
        ends = np.flatnonzero(np.frombuffer(text, dtype=np.uint8) == ord("\n")) + 1
        offsets = np.concatenate([[0], ends])
        stop = start + len(ends)
        row = start
        while row < stop:
            k = int(np.searchsorted(self.bounds, row, side="right") - 1)
            if k != self.current:
                self._open(k)
            last = min(stop, self.bounds[k + 1])
            self.stream.write(text[offsets[row - start]:offsets[last - start]])
            row = last

    def _open(self, k: int) -> None:
        self._close()
        self.raw = open(self.tmp[k], "wb")
        # mtime=0 and no file name in the gzip header: identical bytes on every run.
        self.stream = gzip.GzipFile(filename="", mode="wb", fileobj=self.raw, mtime=0, compresslevel=6) \
            if self.cfg.gzip else self.raw
        if self.header is not None:
            self.stream.write(self.header + b"\n")
        self.current = k

    def _close(self) -> None:
        if self.stream is not None and self.stream is not self.raw:
            self.stream.close()
        if self.raw is not None:
            self.raw.close()
        self.raw = self.stream = None

    def commit(self) -> list[Path]:
        self._close()
        final = [self.cfg.out / n for n in self.names]
        for t, f in zip(self.tmp, final):
            os.replace(t, f)
        return final

    def abort(self) -> None:
        self._close()
        for t in self.tmp:
            t.unlink(missing_ok=True)


def synthesise(cfg: SynthConfig) -> SynthReport:
    """Write the files of ``cfg``; returns what was written and what was measured."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    lay = F.layout(cfg.format)
    out = _Output(cfg, lay.header)
    int_tables = _avazu_int_tables() if cfg.format == "avazu" else {}
    sample_n = min(cfg.rows, SAMPLE_ROWS)
    sample_ranks: list[list[np.ndarray]] = [[] for _ in range(lay.num_cat)]
    sample_prob, sample_labels = [], []
    clicks = 0
    progress = Progress(f"synth {cfg.format}", cfg.rows, log)
    try:
        for chunk, start in enumerate(range(0, cfg.rows, CHUNK_ROWS)):
            n = min(CHUNK_ROWS, cfg.rows - start)
            if cfg.format == "criteo":
                c = criteo_chunk(cfg.seed, chunk, n)
                text = criteo_text(c)
            else:
                c = avazu_chunk(cfg.seed, chunk, start, n, cfg.rows)
                text = avazu_text(c, int_tables)
            clicks += int(c.labels.sum())
            if start < sample_n:
                m = min(n, sample_n - start)
                for f in range(lay.num_cat):
                    sample_ranks[f].append(c.ranks[:m, f].astype(np.int32))
                sample_prob.append(c.prob[:m])
                sample_labels.append(c.labels[:m])
            out.write(start, text)
            progress.add(n)
        progress.close()
        files = out.commit()
    except BaseException:
        progress.close()
        out.abort()
        raise
    share = top_share([np.concatenate(v) for v in sample_ranks])
    bayes = auc(np.concatenate(sample_labels), np.concatenate(sample_prob))
    return SynthReport(files, cfg.rows, clicks / cfg.rows, sample_n, share, bayes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagpipe data synth", description=__doc__.splitlines()[0])
    parser.add_argument("--format", required=True, choices=F.FORMATS)
    parser.add_argument("--rows", required=True, type=int)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--files", type=int, default=1, help="split the rows into this many files")
    parser.add_argument("--gzip", action="store_true", help="write .gz files")
    args = parser.parse_args(argv)
    init_logger("synth")
    try:
        cfg = SynthConfig(args.format, args.rows, args.out, args.seed, args.files, args.gzip)
    except ValueError as exc:
        parser.error(str(exc))
    report = synthesise(cfg)
    print(f"wrote {report.rows} {cfg.format} rows to {len(report.files)} file(s) in {cfg.out}: "
          f"CTR {report.ctr:.3f}; on the first {report.sample_rows} rows, top 1% of rows take "
          f"{100 * report.top1pct_share:.1f}% of lookups; the hidden model's own AUC is {report.bayes_auc:.3f}")
    return 0
