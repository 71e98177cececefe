"""Raw Criteo or Avazu files (plain or gzip) to Parquet, streaming with bounded memory.

    bagpipe data prepare --format criteo|avazu --input PATH... --out DIR [--replace]
        [--hash-buckets N | --min-frequency K] [--on-bad-row fail|skip]
        [--eval-fraction F] [--rows-per-group R] [--bag-separator C --bags N1,...]
    bagpipe data prepare --format mlperf-npz --input DAY.npz... --out DIR (data/mlperf.py)

Output: ``DIR/train/part-*.parquet``, ``DIR/eval/part-*.parquet`` (row groups
of R rows) and ``DIR/meta.json``; columns ``label`` (float32),
``dense_0..`` (float32) and one int64 row-id column per categorical feature;
every page carries a CRC-32 that readers verify. With ``--bag-separator`` a
categorical field holds a bag of ids (``a,b,c``) and a table whose bag exceeds
one is a ``list<int64>`` column (docs/multihot.md). DIR must be new or empty;
``--replace`` replaces a dataset this command made there (and nothing else:
not a directory holding other files, nor one holding an input).
See docs/data.md for every choice (log transform, hashing, vocabulary, eval
split).

Parsing is vectorised numpy over blocks of whole lines (8 MiB by default):
the separators of a block are located at once, then every field of a kind
(hex, integer, label) is loaded as one 8-byte word and validated and
converted for all rows together with SWAR arithmetic (longer fields take a
slower byte-matrix path). A bad row is located (file, line, column, value)
from the same validity masks, so no per-line Python runs except to quote the
first few bad rows.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bagpipe.progress import Progress
from bagpipe.dataset import PARQUET_WRITE_OPTIONS, content_hash, file_schema
from bagpipe.log import init_logger
from data import formats as F
from data import mlperf

log = logging.getLogger("bagpipe.data.prepare")

META_VERSION = 1
BAD_ROW_EXAMPLES = 5
# Longest integer field accepted (sign included): 18 characters always fit int64.
MAX_INT_CHARS = 18
MAX_HEX_CHARS = 16
MAX_ID_CHARS = 20

_HEX_LUT = np.full(256, 255, dtype=np.uint8)
_HEX_LUT[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX_LUT[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX_LUT[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


class PrepareError(Exception):
    """Bad input or options; the message names the file (and line, column, value) at fault."""


@dataclass(frozen=True)
class PrepareConfig:
    """Everything ``prepare`` needs; validated on construction (errors name the option)."""

    format: str
    inputs: tuple[Path, ...]
    out: Path
    hash_buckets: int | None = 1_000_000
    min_frequency: int | None = None
    on_bad_row: str = "fail"
    eval_fraction: float = 0.05
    rows_per_group: int = 65536
    groups_per_file: int = 64
    cap_tables: bool = True  # hashed tables no larger than the feature needs (data.formats.table_caps)
    replace: bool = False  # replace a dataset prepare made at ``out`` (never anything else)
    block_bytes: int = 8 << 20  # raw bytes parsed at a time
    # Multi-hot text: ids inside a categorical field separated by this character, at most
    # ``bags[t]`` of them in table t (see docs/data.md). None: one value per field.
    bag_separator: str | None = None
    bags: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.format not in F.FORMATS:
            raise ValueError(f"format: {self.format!r} is not one of {', '.join(F.FORMATS)}")
        if not self.inputs:
            raise ValueError("input: at least one file is required")
        if (self.hash_buckets is None) == (self.min_frequency is None):
            raise ValueError("hash_buckets / min_frequency: give exactly one of them")
        if self.hash_buckets is not None and self.hash_buckets < 2:
            raise ValueError(f"hash_buckets: must be >= 2 (id 0 is the missing value), got {self.hash_buckets}")
        if self.min_frequency is not None and self.min_frequency < 1:
            raise ValueError(f"min_frequency: must be >= 1, got {self.min_frequency}")
        if self.on_bad_row not in ("fail", "skip"):
            raise ValueError(f"on_bad_row: must be 'fail' or 'skip', got {self.on_bad_row!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if self.rows_per_group < 1:
            raise ValueError(f"rows_per_group: must be >= 1, got {self.rows_per_group}")
        if self.groups_per_file < 1:
            raise ValueError(f"groups_per_file: must be >= 1, got {self.groups_per_file}")
        if self.block_bytes < 1024:
            raise ValueError(f"block_bytes: must be >= 1024, got {self.block_bytes}")
        if (self.bag_separator is None) != (self.bags is None):
            raise ValueError("bag_separator / bags: give both (multi-hot text) or neither")
        if self.bag_separator is not None:
            lay = F.layout(self.format)
            sep = self.bag_separator
            if len(sep) != 1 or not sep.isascii() or sep in "0123456789abcdefABCDEF-\n\r" or ord(sep) == lay.sep:
                raise ValueError(f"bag_separator: one ASCII character that is not a digit, a hex letter, '-', a "
                                 f"line end or the {self.format} field separator {chr(lay.sep)!r}; got {sep!r}")
            if len(self.bags) != lay.num_cat or min(self.bags) < 1:
                raise ValueError(f"bags: one size >= 1 per categorical column ({lay.num_cat}), got {list(self.bags)}")
            if self.min_frequency is not None:
                raise ValueError("min_frequency: a vocabulary is not built for multi-hot text yet; use hash_buckets")

    def layout(self) -> F.Layout:
        lay = F.layout(self.format)
        if self.bag_separator is None:
            return lay
        return replace(lay, bag_sep=ord(self.bag_separator), bags=tuple(self.bags))


# ------------------------------------------------------------------ reading


MAX_LINE_BYTES = 1 << 20  # a longer line is not Criteo or Avazu: stop rather than buffer it


def _open(path: Path) -> tuple[BinaryIO, BinaryIO, bool]:
    """(stream of the file's content, raw file, is gzip): gunzipped if gzip (by its magic bytes)."""
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise PrepareError(f"{path}: cannot open: {exc.strerror or exc}") from None
    gz = raw.read(2) == b"\x1f\x8b"
    raw.seek(0)
    return (gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw), raw, gz


def iter_blocks(path: Path, block_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(first line number, whole lines) blocks of a plain or gzip file.

    Each block ends with a newline (one is added after a last line without).
    A truncated or corrupt gzip raises PrepareError naming the file.
    """
    stream, raw, gz = _open(path)
    line = 1
    rest = b""
    try:
        while True:
            try:
                data = stream.read(block_bytes)
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise PrepareError(f"{path}: corrupt or truncated gzip input ({exc})") from None
            except OSError as exc:
                what = "corrupt or truncated gzip input" if gz else "read error"
                raise PrepareError(f"{path}: {what} ({exc})") from None
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                if len(data) > MAX_LINE_BYTES:
                    raise PrepareError(f"{path}:{line}: line longer than {MAX_LINE_BYTES} bytes "
                                       "(not a Criteo or Avazu text file?)")
                rest = data
                continue
            block, rest = data[:cut], data[cut:]
            yield line, block
            line += block.count(b"\n")
        if rest:
            yield line, rest + b"\n"
    finally:
        stream.close()
        raw.close()


def count_rows(path: Path, header: bytes | None, block_bytes: int) -> int:
    """Data rows of a file (lines, less the header); checks the header and that rows exist."""
    rows = 0
    first = True
    for _, block in iter_blocks(path, block_bytes):
        if first and header is not None:
            _check_header(path, block)
        rows += block.count(b"\n")
        first = False
    if header is not None:
        rows -= 1
    if rows <= 0:
        raise PrepareError(f"{path}: empty input (no data rows)")
    return rows


def _check_header(path: Path, block: bytes) -> int:
    end = block.find(b"\n")
    got = block[:end].rstrip(b"\r")
    if got != F.layout("avazu").header:
        raise PrepareError(f"{path}:1: expected the Avazu header {F.layout('avazu').header.decode()!r}, "
                           f"got {got[:200].decode(errors='replace')!r}")
    return end + 1


# ------------------------------------------------------------------ parsing


@dataclass
class BadRow:
    file: str
    line: int
    column: str  # "" when the row as a whole is wrong (field count)
    reason: str
    value: str

    def message(self) -> str:
        where = f"{self.file}:{self.line}"
        if self.column:
            return f"{where}: column {self.column}: {self.reason}: {self.value!r}"
        return f"{where}: {self.reason}: {self.value!r}"


@dataclass
class Parsed:
    """The good rows of a block, converted; bad rows described."""

    lines: np.ndarray  # line number of each good row [n]
    labels: np.ndarray  # float32 [n]
    dense: np.ndarray  # float32 [D, n]
    values: np.ndarray  # uint64 [T, n]: categorical value (hex or integer bits)
    missing: np.ndarray  # bool [T, n]
    bad: list[BadRow] = field(default_factory=list)
    bad_count: int = 0
    raw_lines: int = 0  # lines in the block, good and bad
    # Multi-hot text only: per table, (ids per row [n], the values of every row's bag in row order).
    bag_values: list[tuple[np.ndarray, np.ndarray]] | None = None


def _column_names(fmt: str) -> list[str]:
    if fmt == "criteo":
        return ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    return list(F.AVAZU_HEADER)


def _gather(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Fields as right-aligned byte matrices [..., width] (0 = padding) and the mask of positions inside."""
    k = np.arange(width)
    inside = k >= (width - lengths)[..., None]
    idx = (starts + lengths)[..., None] - width + k
    mat = buf[np.where(inside, idx, 0)]
    mat[~inside] = 0
    return mat, inside


class BlockBytes:
    """A block's bytes with 8 zero bytes either side, readable as a little-endian uint64 at any offset.

    Loading the 8 bytes of a field as one integer and decoding them with SWAR
    arithmetic (all lanes of the word at once) is several times faster than
    gathering the field byte by byte.
    """

    PAD = 8

    def __init__(self, block: bytes) -> None:
        self.raw = b"\0" * self.PAD + block + b"\0" * self.PAD
        self.bytes = np.frombuffer(self.raw, dtype=np.uint8)
        self.words = np.ndarray(shape=(len(self.raw) - 7,), dtype="<u8", buffer=self.raw, strides=(1,))

    def u64(self, offsets: np.ndarray) -> np.ndarray:
        """The 8 bytes at each block offset, as little-endian uint64."""
        return self.words[offsets + self.PAD]


_LO4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_ONES = np.uint64(0x0101010101010101)
_CASE = np.uint64(0x2020202020202020)
_GEA = np.uint64(0x1F1F1F1F1F1F1F1F)
_GTF = np.uint64(0x1919191919191919)
_ASCII0 = np.uint64(0x3030303030303030)
_HIGH = np.uint64(0x8080808080808080)
_GE0 = np.uint64(0x5050505050505050)
_GT9 = np.uint64(0x4646464646464646)


def _general_int(buf: BlockBytes, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    width = int(max(1, min(lengths.max(initial=0), MAX_INT_CHARS)))
    mat, inside = _gather(buf.bytes, starts + buf.PAD, np.minimum(lengths, width), width)
    digit = mat - np.uint8(48)  # non-digits wrap above 9
    is_digit = digit <= 9
    first = width - np.minimum(lengths, width)
    first_char = np.take_along_axis(mat, np.minimum(first, width - 1)[..., None], axis=-1)[..., 0]
    neg = (first_char == ord("-")) & (lengths >= 2)
    sign_pos = (np.arange(width) == first[..., None]) & neg[..., None]
    ok = np.all(is_digit | ~inside | sign_pos, axis=-1) & (lengths <= MAX_INT_CHARS)
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    values = (np.where(is_digit & inside, digit, 0).astype(np.int64) * powers).sum(axis=-1)
    return np.where(neg, -values, values), ok


def parse_int(buf: BlockBytes, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed decimal integers (up to 18 characters); empty fields read 0. Returns (int64 values, ok)."""
    shape = starts.shape
    starts, lengths = starts.ravel(), lengths.ravel()
    short = np.minimum(lengths, 8)
    # the 8 bytes that end where the field ends; bytes before the field cleared
    w = buf.u64(starts + short - 8)
    low = (8 - short).astype(np.uint64) * np.uint64(8)  # bit offset of the field's first byte
    keep = np.where(short > 0, ~np.uint64(0) << np.minimum(low, np.uint64(63)), np.uint64(0))
    w &= keep
    first = (w >> np.minimum(low, np.uint64(63))) & np.uint64(0xFF)
    neg = (first == ord("-")) & (short >= 2)
    w += np.where(neg, np.uint64(ord("0") - ord("-")) << low, np.uint64(0))  # '-' -> '0'
    d = w - (_ASCII0 & keep)
    # Every byte of the field a digit, tested on all bytes at once: with no byte
    # >= 0x80, adding 0x50 (0x46) sets a byte's high bit iff it is >= '0' (> '9'),
    # and no addition carries into the next byte.
    high = _HIGH & keep
    ok = ((w & _HIGH) == 0) & (((w + _GE0) & high) == high) & (((w + _GT9) & high) == 0) & (short > 0)
    ok |= lengths == 0
    # SWAR atoi: pairs of digits, then pairs of pairs, then the two halves
    d = (d * np.uint64(10) + (d >> np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    d = (d * np.uint64(100) + (d >> np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    d = (d * np.uint64(10000) + (d >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
    values = d.astype(np.int64)
    values = np.where(neg, -values, values)
    long = np.flatnonzero(lengths > 8)
    if len(long):
        values[long], ok[long] = _general_int(buf, starts[long], lengths[long])
    return values.reshape(shape), ok.reshape(shape)


def parse_hex(buf: BlockBytes, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hex strings (1..16 digits, any case) as uint64; empty fields read 0. Returns (values, ok)."""
    shape = starts.shape
    starts, lengths = starts.ravel(), lengths.ravel()
    # Fast path: the usual 8 hex digits, decoded as one word.
    # A byte is a digit iff it is in '0'..'9' and a letter iff, lowercased, it is in
    # 'a'..'f'; both tested on all 8 bytes at once as in parse_int.
    w = buf.u64(starts)
    digit = (w + _GE0) & ~(w + _GT9)
    lower = w | _CASE
    letter = (lower + _GEA) & ~(lower + _GTF)
    ok = ((w & _HIGH) == 0) & (((digit | letter) & _HIGH) == _HIGH)
    # nibble: the low 4 bits, + 9 for letters (bit 6 set)
    x = (w & _LO4) + ((w >> np.uint64(6)) & _ONES) * np.uint64(9)
    x = ((x << np.uint64(4)) | (x >> np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    x = ((x << np.uint64(8)) | (x >> np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    values = ((x << np.uint64(16)) | (x >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
    ok |= lengths == 0
    values[lengths == 0] = 0
    other = np.flatnonzero((lengths != 8) & (lengths != 0))
    if len(other):
        ln = lengths[other]
        width = int(min(ln.max(), MAX_HEX_CHARS))
        mat, inside = _gather(buf.bytes, starts[other] + buf.PAD, np.minimum(ln, width), width)
        nb = _HEX_LUT[mat]
        ok[other] = np.all((nb != 255) | ~inside, axis=-1) & (ln <= MAX_HEX_CHARS)
        shifts = np.arange(4 * (width - 1), -1, -4, dtype=np.uint64)
        values[other] = (np.where(inside & (nb != 255), nb, 0).astype(np.uint64) << shifts).sum(axis=-1, dtype=np.uint64)
    return values.reshape(shape), ok.reshape(shape)


def _days_from_civil(y: np.ndarray, m: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of proleptic Gregorian dates (vectorised)."""
    y = y - (m <= 2)
    era = np.floor_divide(y, 400)
    yoe = y - era * 400
    doy = (153 * (m + np.where(m > 2, -3, 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def parse_hour(buf: BlockBytes, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Avazu's YYMMDDHH (20YY). Returns (hour of day, day of week Monday=0, ok)."""
    v, ok = parse_int(buf, starts, lengths)
    ok &= (lengths == 8) & (v >= 0)
    yy, mm, dd, hh = v // 1_000_000, v // 10_000 % 100, v // 100 % 100, v % 100
    year = 2000 + yy
    leap = ((year % 4 == 0) & (year % 100 != 0)) | (year % 400 == 0)
    month_days = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[np.clip(mm, 0, 12)] + (leap & (mm == 2))
    ok &= (mm >= 1) & (mm <= 12) & (dd >= 1) & (dd <= month_days) & (hh <= 23)
    days = _days_from_civil(year, np.clip(mm, 1, 12), np.clip(dd, 1, 31))
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday
    return np.where(ok, hh, 0), np.where(ok, weekday, 0), ok


def parse_block(block: bytes, lay: F.Layout, file: str, first_line: int, keep_examples: int) -> Parsed:
    """Parse and validate a block of whole lines of format ``lay``.

    Arrays are field-major ([field, row]) so that a run of fields of one kind
    is one contiguous slice.
    """
    if b"\r" in block:
        block = block.replace(b"\r\n", b"\n")  # CRLF files; a stray CR stays and fails validation
    buf = np.frombuffer(block, dtype=np.uint8)
    words = BlockBytes(block)
    nf = lay.num_fields
    pos = np.flatnonzero((buf == lay.sep) | (buf == 10))
    newline = np.flatnonzero(buf[pos] == 10)
    n = len(newline)
    fields = np.diff(newline, prepend=-1)
    line_start = np.empty(n, dtype=np.int64)
    line_start[0] = 0
    line_start[1:] = pos[newline[:-1]] + 1
    line_no = first_line + np.arange(n)
    names = _column_names(lay.name)
    bad: list[BadRow] = []
    shape_ok = fields == nf
    if shape_ok.all():
        ends = np.ascontiguousarray(pos.reshape(n, nf).T)
        starts_line = line_start
    else:
        for i in np.flatnonzero(~shape_ok)[:keep_examples]:
            text = block[line_start[i]:pos[newline[i]]].decode(errors="replace")
            bad.append(BadRow(file, int(line_no[i]), "", f"expected {nf} fields, got {int(fields[i])}", text[:200]))
        ends = np.ascontiguousarray(pos[np.repeat(shape_ok, fields)].reshape(-1, nf).T)
        starts_line = line_start[shape_ok]
        line_no = line_no[shape_ok]
    m = ends.shape[1]
    starts = np.empty_like(ends)
    starts[0] = starts_line
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts

    # (field, row) problems, with a reason per field
    field_bad = np.zeros((nf, m), dtype=bool)
    reasons: dict[int, str] = {}

    def check(cols: slice | np.ndarray | int, ok: np.ndarray, reason: str) -> None:
        field_bad[cols] |= ~ok
        for c in np.arange(nf)[cols].ravel():
            reasons[int(c)] = reason

    label_field = 0 if lay.name == "criteo" else 1
    lab_byte = buf[np.minimum(starts[label_field], len(buf) - 1)]
    check(label_field, (lengths[label_field] == 1) & ((lab_byte == 48) | (lab_byte == 49)), "label must be 0 or 1")
    labels = (lab_byte == 49).astype(np.float32)

    values = np.zeros((lay.num_cat, m), dtype=np.uint64)
    cat = np.array(lay.cat_fields)
    missing = lengths[cat] == 0
    is_hex = np.array(lay.hex_cats)
    items = None
    if lay.bag_sep is not None:
        items = _parse_bag_fields(buf, words, starts, ends, lay, check)
    elif is_hex.all():  # Criteo: the categorical fields are one contiguous run
        run = slice(int(cat[0]), int(cat[-1]) + 1)
        values, ok = parse_hex(words, starts[run], lengths[run])
        check(run, ok, f"not a hex string (1 to {MAX_HEX_CHARS} hex digits, or empty)")
    else:
        hexc, intc = cat[is_hex], cat[~is_hex]
        v, ok = parse_hex(words, starts[hexc], lengths[hexc])
        values[is_hex] = v
        check(hexc, ok, f"not a hex string (1 to {MAX_HEX_CHARS} hex digits, or empty)")
        v, ok = parse_int(words, starts[intc], lengths[intc])
        values[~is_hex] = v.view(np.uint64)
        check(intc, ok, "not an integer")

    if lay.name == "criteo":
        run = slice(1, 1 + F.CRITEO_NUM_DENSE)
        v, ok = parse_int(words, starts[run], lengths[run])
        check(run, ok, "not an integer")
        # log(1 + x) with negatives clamped to 0; a missing value reads 0 too
        dense = np.log1p(np.maximum(v, 0).astype(np.float32))
    else:
        id_len = lengths[0]
        mat, inside = _gather(buf, starts[0], np.minimum(id_len, MAX_ID_CHARS), MAX_ID_CHARS)
        id_ok = np.all(((mat >= 48) & (mat <= 57)) | ~inside, axis=1) & (id_len >= 1) & (id_len <= MAX_ID_CHARS)
        check(0, id_ok, "id must be a decimal integer")
        hod, dow, ok = parse_hour(words, starts[2], lengths[2])
        check(2, ok, "hour must be YYMMDDHH")
        dense = np.stack([hod / 23.0, dow / 6.0]).astype(np.float32)

    row_bad = field_bad.any(axis=0)
    if row_bad.any():
        rows = np.flatnonzero(row_bad)[:keep_examples]
        for r, c in zip(rows, np.argmax(field_bad[:, rows], axis=0)):
            raw = block[starts[c, r]:ends[c, r]].decode(errors="replace")
            bad.append(BadRow(file, int(line_no[r]), f"{c + 1} ({names[c]})", reasons[int(c)], raw[:200]))
        good = ~row_bad
        line_no, labels = line_no[good], labels[good]
        dense, values, missing = dense[:, good], values[:, good], missing[:, good]
    bag_values = None
    if items is not None:
        item_row, item_table, item_value, counts = items
        keep = ~row_bad[item_row]
        item_table, item_value = item_table[keep], item_value[keep]
        counts = counts[:, ~row_bad]
        # Block order is row-major, so a stable sort by table keeps each table's ids in row order.
        order = np.argsort(item_table, kind="stable")
        split = np.cumsum(np.bincount(item_table, minlength=lay.num_cat))[:-1]
        bag_values = list(zip(counts, np.split(item_value[order], split)))
    bad.sort(key=lambda b: b.line)
    bad_count = int((~shape_ok).sum() + row_bad.sum())
    return Parsed(line_no, labels, dense, values, missing, bad[:keep_examples], bad_count, n, bag_values)


def _parse_bag_fields(buf: np.ndarray, words: BlockBytes, starts: np.ndarray, ends: np.ndarray, lay: F.Layout,
                      check) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The categorical fields of multi-hot text: each a bag of ids separated by ``lay.bag_sep``.

    Returns, for every id of every bag in block order, its row, its table and its value, and the
    number of ids per (table, row) (0: an empty field, an empty bag). Marks through ``check`` a
    field with an empty id inside it (``a,,b``), an id that does not parse, or more ids than
    ``lay.bags`` allows. Vectorised like the rest: the separators of the whole block are found at
    once and every id becomes one (start, length) pair, parsed together.
    """
    nf, m = starts.shape
    cat = np.array(lay.cat_fields)
    t_of_field = np.full(nf, -1, np.int64)
    t_of_field[cat] = np.arange(len(cat))
    # Fields in block order (row-major) and which of them each separator falls in.
    fs, fe = starts.T.ravel(), ends.T.ravel()
    q = np.flatnonzero(buf == lay.bag_sep)
    at = np.searchsorted(fs, q, side="right") - 1
    inside = (at >= 0) & (q < fe[np.maximum(at, 0)])
    q, at = q[inside], at[inside]
    in_cat = t_of_field[at % nf] >= 0
    q, at = q[in_cat], at[in_cat]
    seps = np.bincount(at, minlength=nf * m).reshape(m, nf).T  # [nf, m] separators per field
    lengths = ends - starts
    nonempty = lengths[cat] > 0  # [T, m]
    counts = np.where(nonempty, seps[cat] + 1, 0)
    # Every id's (start, end): a non-empty field's start or a separator + 1, and the next
    # separator or the field's end; sorted, the two lists pair up id by id.
    f_start = starts[cat][nonempty]
    f_end = ends[cat][nonempty]
    item_start = np.sort(np.concatenate([f_start, q + 1]))
    item_end = np.sort(np.concatenate([q, f_end]))
    item_len = item_end - item_start
    flat = np.searchsorted(fs, item_start, side="right") - 1
    item_row, item_field = flat // nf, flat % nf
    item_table = t_of_field[item_field]
    hexes = np.array(lay.hex_cats)[item_table]
    item_value = np.zeros(len(item_start), np.uint64)
    ok = np.ones(len(item_start), bool)
    if hexes.any():
        item_value[hexes], ok[hexes] = parse_hex(words, item_start[hexes], item_len[hexes])
    if (~hexes).any():
        v, ok_int = parse_int(words, item_start[~hexes], item_len[~hexes])
        item_value[~hexes], ok[~hexes] = v.view(np.uint64), ok_int
    def fields_without(bad_items: np.ndarray) -> np.ndarray:  # [nf, m]: no item of the field is bad
        return np.bincount(flat[bad_items], minlength=nf * m).reshape(m, nf).T == 0

    field_ok = fields_without(~ok)
    empty_ok = fields_without(item_len == 0)
    # One reason per column (check's rule): each is given only for the columns it fails.
    for col_ok, reason in ((field_ok[cat], "a bag's id does not parse (hex or integer, per the format)"),
                           (empty_ok[cat], f"an empty id inside a bag ({chr(lay.bag_sep)!r} twice, or at an end)"),
                           (counts <= np.array(lay.bags)[:, None], "more ids in the bag than --bags allows")):
        failing = ~col_ok.all(axis=1)
        if failing.any():
            check(cat[failing], col_ok[failing], reason)
    return item_row, item_table, item_value, counts


# ------------------------------------------------------------------ ids


class HashEncoder:
    """id = 0 for a missing value, else 1 + stable_hash(value, column) mod (num_embeddings - 1)."""

    def __init__(self, fmt: str, buckets: int, cap: bool) -> None:
        caps = F.table_caps(fmt) if cap else (buckets,) * F.layout(fmt).num_cat
        self.sizes = [max(2, min(buckets, c)) for c in caps]

    def encode(self, values: np.ndarray, missing: np.ndarray) -> list[np.ndarray]:
        """Per table, the ids of values [T, n] (missing [T, n])."""
        return [F.hashed_ids(values[t], missing[t], t, size) for t, size in enumerate(self.sizes)]


class BagColumn:
    """A multi-hot table's ids on their way to Parquet: ids per row and the ids in row order."""

    def __init__(self, counts: np.ndarray, ids: np.ndarray) -> None:
        self.counts, self.ids = counts.astype(np.int64), ids.astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, rows: slice | np.ndarray) -> "BagColumn":
        if isinstance(rows, slice):
            a, b, _ = rows.indices(len(self))
            return BagColumn(self.counts[a:b], self.ids[self.offsets[a]:self.offsets[max(a, b)]])
        keep = np.repeat(rows, self.counts)  # a row mask
        return BagColumn(self.counts[rows], self.ids[keep])

    def copy(self) -> "BagColumn":
        return BagColumn(self.counts.copy(), self.ids.copy())

    @staticmethod
    def concatenate(parts: list["BagColumn"]) -> "BagColumn":
        return BagColumn(np.concatenate([p.counts for p in parts]), np.concatenate([p.ids for p in parts]))

    def to_arrow(self) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(self.offsets.astype(np.int32)), pa.array(self.ids))


def encode_bags(encoder: "HashEncoder", bags: tuple[int, ...], parsed: Parsed) -> list:
    """Per table, the ids of multi-hot text: an int64 column for a table of bag 1 (an empty field
    is the missing value's id 0, as in one-hot text), a ``BagColumn`` otherwise (an empty field is
    an empty bag, which pools to zero)."""
    assert parsed.bag_values is not None
    cols: list = []
    for t, ((counts, values), size, bag) in enumerate(zip(parsed.bag_values, encoder.sizes, bags)):
        ids = F.hashed_ids(values, np.zeros(len(values), bool), t, size)
        if bag == 1:
            one = np.zeros(len(counts), np.int64)
            one[counts == 1] = ids
            cols.append(one)
        else:
            cols.append(BagColumn(counts, ids))
    return cols


def _concatenate(parts: list) -> np.ndarray | BagColumn:
    return BagColumn.concatenate(parts) if isinstance(parts[0], BagColumn) else np.concatenate(parts)


def _arrow(col: np.ndarray | BagColumn) -> pa.Array | np.ndarray:
    return col.to_arrow() if isinstance(col, BagColumn) else col


class ValueCounts:
    """Counts of the uint64 values of one column: sorted unique values and counts.

    Chunks are merged lazily (when the pending ones outgrow the merged
    arrays), so the cost is O(n log n) overall and the memory about 16 bytes
    per distinct value.
    """

    MERGE_MIN = 1 << 16  # pending distinct values worth a merge, at least

    def __init__(self) -> None:
        self.values = np.empty(0, dtype=np.uint64)
        self.counts = np.empty(0, dtype=np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_size = 0
        self.missing = 0

    def add(self, values: np.ndarray, missing: np.ndarray) -> None:
        self.missing += int(missing.sum())
        v, c = np.unique(values[~missing], return_counts=True)
        self.pending.append((v, c))
        self.pending_size += len(v)
        if self.pending_size > max(len(self.values), self.MERGE_MIN):
            self._merge()

    def _merge(self) -> None:
        if not self.pending:
            return
        v = np.concatenate([self.values] + [p[0] for p in self.pending])
        c = np.concatenate([self.counts] + [p[1] for p in self.pending])
        order = np.argsort(v, kind="stable")
        v, c = v[order], c[order]
        first = np.flatnonzero(np.diff(v, prepend=v[:1] + np.uint64(1)) != 0) if len(v) else np.empty(0, np.int64)
        self.values = v[first]
        self.counts = np.add.reduceat(c, first) if len(v) else c
        self.pending, self.pending_size = [], 0

    def finish(self) -> tuple[np.ndarray, np.ndarray, int]:
        self._merge()
        return self.values, self.counts, self.missing


class VocabEncoder:
    """Ids from a vocabulary counted over the train rows.

    Per column, the values seen at least ``min_frequency`` times (a missing
    value counts as a value of its own) get ids 1, 2, ... by descending count
    (ties: missing first, then by value); every other value (rare, or unseen
    in train) shares id 0.
    """

    def __init__(self, counts: list[ValueCounts], min_frequency: int) -> None:
        self.keys: list[np.ndarray] = []  # kept values, sorted
        self.ids: list[np.ndarray] = []  # their ids
        self.missing_ids: list[int] = []
        self.sizes: list[int] = []
        for cnt in counts:
            values, c, nmiss = cnt.finish()
            kept = c >= min_frequency
            values, c = values[kept], c[kept]
            has_missing = nmiss >= min_frequency
            # rank by (-count, value); the missing value goes before any value of equal count
            order = np.lexsort((values, -c))
            rank = np.empty(len(values), dtype=np.int64)
            rank[order] = np.arange(len(values))
            missing_rank = int(np.searchsorted(-c[order], -nmiss, side="left")) if has_missing else -1
            ids = rank + 1
            if has_missing:
                ids += rank >= missing_rank  # values after the missing value move up one
            self.keys.append(values)
            self.ids.append(ids.astype(np.int64))
            self.missing_ids.append(missing_rank + 1 if has_missing else 0)
            self.sizes.append(1 + len(values) + int(has_missing))

    def encode(self, values: np.ndarray, missing: np.ndarray) -> list[np.ndarray]:
        """Per table, the ids of values [T, n] (missing [T, n])."""
        out = []
        for t, keys in enumerate(self.keys):
            v = values[t]
            ids = np.zeros(len(v), dtype=np.int64)
            if len(keys):
                at = np.minimum(np.searchsorted(keys, v), len(keys) - 1)
                ids = np.where(keys[at] == v, self.ids[t][at], 0)
            ids[missing[t]] = self.missing_ids[t]
            out.append(ids)
        return out


# ------------------------------------------------------------------ writing


class SplitWriter:
    """Writes one split's rows as Parquet parts with row groups of exactly ``rows_per_group`` rows."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_group: int, groups_per_file: int) -> None:
        self.dir, self.schema = directory, schema
        self.rows_per_group, self.groups_per_file = rows_per_group, groups_per_file
        self.dir.mkdir(parents=True)
        self.buffer: list[list[np.ndarray]] = []
        self.buffered = 0
        self.rows = 0
        self.files: list[Path] = []
        self.writer: pq.ParquetWriter | None = None
        self.groups_in_file = 0

    def add(self, columns: list[np.ndarray]) -> None:
        self.buffer.append(columns)
        self.buffered += len(columns[0])
        if self.buffered >= self.rows_per_group:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.buffered:
            return
        cols = [_concatenate(list(parts)) for parts in zip(*self.buffer)]
        full = self.buffered if final else self.buffered - self.buffered % self.rows_per_group
        done = 0
        while done < full:
            if self.writer is None:
                path = self.dir / f"part-{len(self.files):05d}.parquet"
                self.files.append(path)
                self.writer = pq.ParquetWriter(path, self.schema, **PARQUET_WRITE_OPTIONS)
                self.groups_in_file = 0
            take = min(full - done, (self.groups_per_file - self.groups_in_file) * self.rows_per_group)
            table = pa.table([_arrow(c[done:done + take]) for c in cols], schema=self.schema)
            self.writer.write_table(table, row_group_size=self.rows_per_group)
            self.groups_in_file += -(-take // self.rows_per_group)
            done += take
            if self.groups_in_file >= self.groups_per_file:
                self.writer.close()
                self.writer = None
        self.rows += full
        rest = [c[full:].copy() for c in cols]  # copies: free the big concatenation
        self.buffer = [rest] if len(rest[0]) else []
        self.buffered = len(rest[0])

    def close(self) -> None:
        self._flush(final=True)
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def output_schema(lay: F.Layout) -> pa.Schema:
    return file_schema(lay.num_dense, list(lay.cat_names), list(lay.bags) if lay.bags else None)


# ------------------------------------------------------------------ the passes


@dataclass
class _BadRows:
    policy: str
    quiet: bool = False  # a first pass: the main pass reports the same rows
    count: int = 0
    examples: list[BadRow] = field(default_factory=list)

    def add(self, parsed: Parsed) -> None:
        if not parsed.bad_count:
            return
        if self.policy == "fail":
            raise PrepareError(f"bad row: {parsed.bad[0].message()} (use --on-bad-row skip to skip bad rows)")
        for b in parsed.bad:
            if len(self.examples) < BAD_ROW_EXAMPLES and not self.quiet:
                log.warning("skipping bad row: %s", b.message())
                self.examples.append(b)
        self.count += parsed.bad_count


def _rows_of(cfg: PrepareConfig, lay: F.Layout, progress: Progress,
             bad: _BadRows) -> Iterator[tuple[int, Parsed]]:
    """(row base, parsed block) over every input in order: row base + line number = global row index.

    The global row index counts physical data lines (bad ones too) across the
    inputs; the eval split is defined on it.
    """
    header_lines = 1 if lay.header is not None else 0
    offset = 0
    for path in cfg.inputs:
        data_rows = 0
        for first_line, block in iter_blocks(path, cfg.block_bytes):
            if first_line == 1 and lay.header is not None:
                block = block[_check_header(path, block):]
                first_line = 2
                if not block:
                    continue
            parsed = parse_block(block, lay, str(path), first_line, BAD_ROW_EXAMPLES)
            bad.add(parsed)
            data_rows += parsed.raw_lines
            progress.add(parsed.raw_lines)
            yield offset - 1 - header_lines, parsed
        if data_rows == 0:
            raise PrepareError(f"{path}: empty input (no data rows)")
        offset += data_rows


@dataclass
class PrepareResult:
    meta: dict
    rows_per_s: float  # raw rows (good and bad) per second over the whole run


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Run every pass and write ``cfg.out`` atomically; returns meta.json's content and the speed."""
    lay = cfg.layout()
    for path in cfg.inputs:
        if not path.is_file():
            raise PrepareError(f"{path}: no such file")
    check_out(cfg)
    started = time.perf_counter()
    # The eval split is the last rows, so it needs the row count first (a cheap pass,
    # which also finds empty inputs and broken gzip before anything is written).
    first_eval = total = None
    if cfg.eval_fraction > 0:
        total = sum(count_rows(path, lay.header, cfg.block_bytes) for path in cfg.inputs)
        first_eval = total - int(total * cfg.eval_fraction)
        log.info("%d rows in %d file(s); rows %d.. form the eval split", total, len(cfg.inputs), first_eval)

    def is_eval(row_base: int, parsed: Parsed) -> np.ndarray:
        if first_eval is None:
            return np.zeros(len(parsed.lines), dtype=bool)
        return row_base + parsed.lines >= first_eval

    if cfg.min_frequency is not None:
        # First pass: value counts over the train rows only (eval values never leak into ids).
        counts = [ValueCounts() for _ in range(lay.num_cat)]
        counting = Progress("vocabulary pass", total, log)
        for row_base, parsed in _rows_of(cfg, lay, counting, _BadRows(cfg.on_bad_row, quiet=True)):
            train = ~is_eval(row_base, parsed)
            for t, cnt in enumerate(counts):
                cnt.add(parsed.values[t, train], parsed.missing[t, train])
        counting.close()
        encoder: HashEncoder | VocabEncoder = VocabEncoder(counts, cfg.min_frequency)
        del counts
        log.info("vocabulary: %s ids per table", encoder.sizes)
    else:
        encoder = HashEncoder(cfg.format, cfg.hash_buckets, cfg.cap_tables)

    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.out.parent / f".{cfg.out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    progress = Progress("prepare", total, log)
    bad = _BadRows(cfg.on_bad_row)
    try:
        schema = output_schema(lay)
        writers = {s: SplitWriter(tmp / s, schema, cfg.rows_per_group, cfg.groups_per_file) for s in ("train", "eval")}
        for row_base, parsed in _rows_of(cfg, lay, progress, bad):
            if lay.bags is not None:
                ids = encode_bags(encoder, lay.bags, parsed)
            else:
                ids = encoder.encode(parsed.values, parsed.missing)
            ev = is_eval(row_base, parsed)
            cols = [parsed.labels] + list(parsed.dense) + ids
            for name, mask in (("train", ~ev), ("eval", ev)):
                if mask.all():
                    writers[name].add(cols)
                elif mask.any():
                    writers[name].add([c[mask] for c in cols])
        for w in writers.values():
            w.close()
        meta = _meta(cfg, lay, encoder, writers, bad, tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        check_out(cfg)  # again: nothing may have appeared there during the passes
        replace_dir(tmp, cfg.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - started
    progress.close()
    rate = progress.done / max(elapsed, 1e-9)
    log.info("wrote %d train and %d eval rows to %s in %.1f s (%.0f rows/s), %d bad rows skipped",
             meta["rows"], meta["eval_rows"], cfg.out, elapsed, rate, bad.count)
    return PrepareResult(meta, rate)


# What a prepared dataset directory holds: nothing else is ever deleted by --replace.
_OUTPUT_DIRS = ("train", "eval")


def check_out(cfg: PrepareConfig) -> None:
    """Refuse an ``--out`` whose replacement would destroy anything but a dataset prepare made.

    New or empty: fine. A dataset this command made (its meta.json says so, and
    it holds only meta.json and train/, eval/ of part files): only with
    ``--replace``. Anything else, or a directory that holds an input: never.
    """
    out = cfg.out
    for path in cfg.inputs:
        if path.resolve().is_relative_to(out.resolve()):
            raise PrepareError(f"--out {out}: holds the input {path}; write the dataset somewhere else")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise PrepareError(f"--out {out}: exists and is not a directory")
    entries = sorted(out.iterdir())
    if not entries:
        return
    made = False
    try:
        made = json.loads((out / "meta.json").read_text()).get("created_by") == "bagpipe data prepare"
    except (OSError, ValueError, AttributeError):
        pass
    if not made:
        raise PrepareError(f"--out {out}: not empty ({len(entries)} entries, e.g. {entries[0].name}) and not a "
                           "dataset made by `bagpipe data prepare`; give a new or empty directory")
    for e in entries:
        if e.name == "meta.json" and e.is_file():
            continue
        inside = sorted(e.iterdir()) if e.name in _OUTPUT_DIRS and e.is_dir() and not e.is_symlink() else [e]
        for f in inside:
            if f is e or f.suffix != ".parquet" or not f.is_file() or f.is_symlink():
                raise PrepareError(f"--out {out}: holds {f}, which `bagpipe data prepare` did not write; "
                                   "give a new or empty directory")
    if not cfg.replace:
        raise PrepareError(f"--out {out}: already holds a prepared dataset; pass --replace to replace it")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``, replacing what was there (``check_out`` allowed it)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def _meta(cfg: PrepareConfig, lay: F.Layout, encoder, writers: dict[str, SplitWriter], bad: _BadRows,
          root: Path) -> dict:
    files = writers["train"].files + writers["eval"].files
    return {
        "version": META_VERSION,
        "format": cfg.format,
        "rows": writers["train"].rows,
        "eval_rows": writers["eval"].rows,
        "bad_rows": bad.count,
        "bad_row_examples": [asdict(b) for b in bad.examples],
        "num_dense": lay.num_dense,
        "dense": ("log(1 + max(x, 0)) of I1..I13, missing 0" if cfg.format == "criteo"
                  else "hour of day / 23, day of week (Monday 0) / 6, from `hour`"),
        "tables": [{"name": n, "num_embeddings": int(s), **({"bag": int(b)} if lay.bags else {})}
                   for n, s, b in zip(lay.cat_names, encoder.sizes, lay.bags or [1] * lay.num_cat)],
        "files": {s: [p.relative_to(root).as_posix() for p in w.files] for s, w in writers.items()},
        "rows_per_group": cfg.rows_per_group,
        "page_checksums": PARQUET_WRITE_OPTIONS["write_page_checksum"],
        "params": {
            "ids": "hash" if cfg.hash_buckets is not None else "vocabulary",
            "hash_buckets": cfg.hash_buckets,
            "cap_tables": cfg.cap_tables if cfg.hash_buckets is not None else None,
            "min_frequency": cfg.min_frequency,
            "eval_fraction": cfg.eval_fraction,
            "eval_split": "last rows",
            "on_bad_row": cfg.on_bad_row,
            "rows_per_group": cfg.rows_per_group,
            "bag_separator": cfg.bag_separator,
        },
        "inputs": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in cfg.inputs],
        "content_hash": content_hash(root, [p.relative_to(root).as_posix() for p in files]),
        "created_by": "bagpipe data prepare",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagpipe data prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--format", required=True, choices=F.FORMATS + (mlperf.FORMAT,),
                        help=f"{mlperf.FORMAT}: MLPerf DLRM-DCNv2's materialized multi-hot days (data/mlperf.py)")
    parser.add_argument("--input", required=True, nargs="+", type=Path,
                        help="raw files, plain or .gz, in order (mlperf-npz: each day's _sparse_multi_hot.npz)")
    parser.add_argument("--out", required=True, type=Path,
                        help="a new or empty directory (or, with --replace, a dataset this command made)")
    parser.add_argument("--replace", action="store_true", help="replace the prepared dataset at --out")
    ids = parser.add_mutually_exclusive_group()
    ids.add_argument("--hash-buckets", type=int, help="hash values into at most N ids per table (default 1000000)")
    ids.add_argument("--min-frequency", type=int, help="vocabulary of values seen at least K times; others share id 0")
    parser.add_argument("--no-cap", action="store_true", help="hashed tables all get N ids, whatever the feature")
    parser.add_argument("--on-bad-row", default="fail", choices=("fail", "skip"))
    parser.add_argument("--eval-fraction", type=float, default=0.05, help="the last F of the rows form the eval split")
    parser.add_argument("--rows-per-group", type=int, default=65536)
    parser.add_argument("--bag-separator", help="multi-hot text: the character between ids inside a categorical "
                        "field (e.g. ','; needs --bags)")
    parser.add_argument("--bags", help="with --bag-separator: the most ids per field, 'mlperf', N for all, or N1,N2,...")
    parser.add_argument("--num-embeddings", help="mlperf-npz only: rows per table, 'mlperf' or N1,N2,... "
                        "(default: each table's largest id + 1)")
    args = parser.parse_args(argv)
    init_logger("prepare")
    if args.format == mlperf.FORMAT:
        return _main_mlperf(parser, args)
    if args.num_embeddings is not None:
        parser.error(f"--num-embeddings: only for --format {mlperf.FORMAT} (text inputs hash or count their ids)")
    buckets = args.hash_buckets if args.hash_buckets is not None or args.min_frequency is not None else 1_000_000
    bags = None
    if args.bags is not None:
        from data.multihot import MultiHotError, parse_bags
        try:
            bags = parse_bags(args.bags, F.layout(args.format).num_cat)
        except MultiHotError as exc:
            parser.error(str(exc))
    try:
        cfg = PrepareConfig(args.format, tuple(args.input), args.out, buckets, args.min_frequency,
                            args.on_bad_row, args.eval_fraction, args.rows_per_group, cap_tables=not args.no_cap,
                            replace=args.replace, bag_separator=args.bag_separator, bags=bags)
    except ValueError as exc:
        parser.error(str(exc).replace("bag_separator", "--bag-separator").replace("bags:", "--bags:"))
    try:
        result = prepare(cfg)
    except PrepareError as exc:
        print(f"bagpipe data prepare: error: {exc}", file=sys.stderr)
        return 1
    meta = result.meta
    print(f"{cfg.out}: {meta['rows']} train rows, {meta['eval_rows']} eval rows, {meta['bad_rows']} bad rows "
          f"skipped ({result.rows_per_s:.0f} rows/s)")
    return 0


def _main_mlperf(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    for opt in ("hash_buckets", "min_frequency", "bag_separator", "bags"):
        if getattr(args, opt) is not None:
            parser.error(f"--{opt.replace('_', '-')}: not for --format {mlperf.FORMAT} (its ids and bags are kept "
                         "as the files hold them)")
    try:
        cfg = mlperf.MlperfConfig(tuple(args.input), args.out, mlperf.parse_num_embeddings(args.num_embeddings),
                                  args.eval_fraction, args.rows_per_group, args.replace)
        meta = mlperf.convert(cfg)
    except mlperf.MlperfError as exc:
        print(f"bagpipe data prepare: error: {exc}", file=sys.stderr)
        return 1
    bags = [t["bag"] for t in meta["tables"]]
    print(f"{cfg.out}: {meta['rows']} train rows, {meta['eval_rows']} eval rows, {len(bags)} tables, "
          f"{sum(bags)} ids per sample")
    return 0
