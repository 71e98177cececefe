"""data/: synthetic raw files, preparation to Parquet, and the batch reader."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data import formats as F
from data.prepare import BlockBytes, PrepareConfig, PrepareError, parse_hex, parse_int, prepare
from bagpipe.dataset import Dataset, DatasetError
from data.synth import SynthConfig, synthesise

ROOT = Path(__file__).resolve().parents[1]
_M = (1 << 64) - 1


# ---------------------------------------------------------------- references


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M
    return x ^ (x >> 31)


def ref_hash_id(value: int, column: int, size: int) -> int:
    """The documented hashed id (docs/data.md), written independently of the numpy code."""
    return 1 + _splitmix64((value & _M) ^ _splitmix64(0xBA6919E + column)) % (size - 1)


def criteo_line(label="0", dense=None, cats=None) -> str:
    dense = dense if dense is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{0x10000000 + i:08x}" for i in range(26)]
    return "\t".join([label] + dense + cats)


AVAZU_GOOD = dict(zip(F.AVAZU_HEADER, [
    "1000009418151094273", "0", "14102100", "1005", "0", "1fbe01fe", "f3845767", "28905ebd", "ecad2386",
    "7801e8d9", "07d7df22", "a99f214a", "ddd2926e", "44956a24", "1", "2", "15706", "320", "50", "1722",
    "0", "35", "-1", "79"]))


def avazu_line(**changes: str) -> str:
    row = dict(AVAZU_GOOD, **changes)
    return ",".join(row[c] for c in F.AVAZU_HEADER)


def write(path: Path, lines: list[str], header: str | None = None) -> Path:
    text = "".join(x + "\n" for x in ([header] if header else []) + lines)
    path.write_text(text)
    return path


def head(path: Path, size: int) -> bytes:
    """The whole lines within the first ``size`` bytes of a file."""
    data = path.read_bytes()[:size]
    return data[: data.rfind(b"\n") + 1]


def read_split(out: Path, split: str = "train"):
    return pq.read_table(out / split).to_pydict()


def cfg(fmt: str, inputs, out: Path, **kw) -> PrepareConfig:
    kw.setdefault("eval_fraction", 0.0)
    return PrepareConfig(fmt, tuple(Path(p) for p in inputs), out, **kw)


def no_leftovers(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


# ---------------------------------------------------------------- fixtures

ROWS = 30_000


@pytest.fixture(scope="module")
def criteo_raw(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("criteo_raw")
    synthesise(SynthConfig("criteo", ROWS, d, seed=3))
    return d / "train.txt"


@pytest.fixture(scope="module")
def prepared(criteo_raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "criteo"
    prepare(cfg("criteo", [criteo_raw], out, hash_buckets=50_000, eval_fraction=0.1, rows_per_group=1000))
    return out


def all_rows(out: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = pq.read_table(out / split)
    names = t.column_names
    dense = np.stack([t.column(n).to_numpy() for n in names if n.startswith("dense_")], axis=1)
    sparse = np.stack([t.column(n).to_numpy() for n in names if n.startswith("cat_")], axis=1)
    return t.column("label").to_numpy(), dense, sparse


def fingerprints(labels, dense, sparse) -> list[bytes]:
    return [labels[i].tobytes() + dense[i].tobytes() + sparse[i].tobytes() for i in range(len(labels))]


# ---------------------------------------------------------------- parsing


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="0123456789-+ a.x", max_size=22), min_size=1, max_size=30))
def test_parse_int_matches_python(fields):
    block = "".join(f + "\n" for f in fields).encode()
    ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
    starts = np.concatenate([[0], ends[:-1] + 1])
    values, ok = parse_int(BlockBytes(block), starts, ends - starts)
    for f, v, good in zip(fields, values, ok):
        expect = f == "" or (re.fullmatch(r"-?[0-9]+", f) is not None and len(f) <= 18)
        assert good == expect, f
        if expect:
            assert v == (int(f) if f else 0), f


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="0123456789abcdefABCDEFgx-", max_size=18), min_size=1, max_size=30))
def test_parse_hex_matches_python(fields):
    block = "".join(f + "\n" for f in fields).encode()
    ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
    starts = np.concatenate([[0], ends[:-1] + 1])
    values, ok = parse_hex(BlockBytes(block), starts, ends - starts)
    for f, v, good in zip(fields, values, ok):
        expect = f == "" or (re.fullmatch(r"[0-9a-fA-F]+", f) is not None and len(f) <= 16)
        assert good == expect, f
        if expect:
            assert int(v) == (int(f, 16) if f else 0), f


# ---------------------------------------------------------------- known lines


def test_criteo_known_lines_hashed(tmp_path):
    dense = ["", "-2", "0", "5", "1000000", "", "7", "", "", "3", "", "", "123456789012"]
    cats = ["68fd1e64", "", "80E26C9B"] + [f"{i:08x}" for i in range(23)]
    src = write(tmp_path / "train.txt", [criteo_line("1", dense, cats), criteo_line("0")])
    out = tmp_path / "out"
    meta = prepare(cfg("criteo", [src], out, hash_buckets=5000)).meta
    sizes = [t["num_embeddings"] for t in meta["tables"]]
    # capped at max(1024, 4 x the larger published cardinality), else the buckets
    assert sizes[8] == 1024 and sizes[16] == 1024 and sizes[0] == 5000 and sizes[13] == 5000
    t = read_split(out)
    assert t["label"] == [1.0, 0.0]
    expect = [0.0 if x == "" else math.log1p(max(int(x), 0)) for x in dense]
    got = [t[f"dense_{j}"][0] for j in range(13)]
    assert np.allclose(got, expect, rtol=1e-6)
    assert got[1] == 0.0  # -2 clamped
    assert t["cat_0"][0] == ref_hash_id(0x68FD1E64, 0, 5000) == 4002  # pinned: the hash must never change
    assert t["cat_1"][0] == 0  # missing
    assert t["cat_2"][0] == ref_hash_id(0x80E26C9B, 2, sizes[2])  # upper case hex: same value
    for c in range(3, 26):
        assert t[f"cat_{c}"][0] == ref_hash_id(c - 3, c, sizes[c])
    assert meta["rows"] == 2 and meta["eval_rows"] == 0 and meta["num_dense"] == 13


def test_criteo_known_lines_vocabulary(tmp_path):
    c0 = ["aaaaaaaa"] * 3 + ["bbbbbbbb"] * 2 + [""] * 2 + ["cccccccc"]
    lines = [criteo_line(cats=[v] + ["0000000f"] * 25) for v in c0]
    src = write(tmp_path / "train.txt", lines)
    out = tmp_path / "out"
    meta = prepare(cfg("criteo", [src], out, hash_buckets=None, min_frequency=2)).meta
    # by descending count, the missing value first among equals; rare values share id 0
    assert read_split(out)["cat_0"] == [1, 1, 1, 3, 3, 2, 2, 0]
    assert meta["tables"][0] == {"name": "cat_0", "num_embeddings": 4}
    assert meta["tables"][1]["num_embeddings"] == 2  # one kept value, no missing
    assert meta["params"]["min_frequency"] == 2


def test_vocabulary_counts_train_rows_only(tmp_path):
    # "dddddddd" appears only in the eval rows (the last half): it must not get an id
    c0 = ["aaaaaaaa"] * 4 + ["dddddddd"] * 4
    src = write(tmp_path / "t.txt", [criteo_line(cats=[v] + ["00000001"] * 25) for v in c0])
    out = tmp_path / "out"
    prepare(cfg("criteo", [src], out, hash_buckets=None, min_frequency=1, eval_fraction=0.5))
    assert read_split(out, "train")["cat_0"] == [1] * 4
    assert read_split(out, "eval")["cat_0"] == [0] * 4


def test_avazu_known_lines(tmp_path):
    lines = [avazu_line(), avazu_line(hour="14102523", click="1", C1="1002", site_id="85F751FD")]
    src = write(tmp_path / "train.csv", lines, header=",".join(F.AVAZU_HEADER))
    out = tmp_path / "out"
    meta = prepare(cfg("avazu", [src], out, hash_buckets=100_000)).meta
    assert [t["name"] for t in meta["tables"]] == list(F.AVAZU_HEADER[3:])
    sizes = {t["name"]: t["num_embeddings"] for t in meta["tables"]}
    assert sizes["C1"] == 1024 and sizes["device_ip"] == 100_000
    t = read_split(out)
    assert t["label"] == [0.0, 1.0]
    # 2014-10-21 00h is a Tuesday; 2014-10-25 23h a Saturday
    assert np.allclose(t["dense_0"], [0.0, 1.0]) and np.allclose(t["dense_1"], [1 / 6, 5 / 6])
    k = F.AVAZU_CAT_COLUMNS.index
    assert t["C1"] == [ref_hash_id(1005, k("C1"), 1024), ref_hash_id(1002, k("C1"), 1024)]
    assert t["site_id"][1] == ref_hash_id(0x85F751FD, k("site_id"), sizes["site_id"])
    assert t["C20"][0] == ref_hash_id(-1, k("C20"), sizes["C20"])  # integer columns hash their int64 bits
    assert meta["num_dense"] == 2


# ---------------------------------------------------------------- bad rows

GOOD_C = criteo_line()
BAD_CRITEO = [
    ("\t".join(GOOD_C.split("\t")[:39]), "", "expected 40 fields, got 39"),
    (GOOD_C + "\t", "", "expected 40 fields, got 41"),
    (criteo_line(dense=["1", "2", "1.5"] + ["0"] * 10), "4 (I3)", "'1.5'"),
    (criteo_line(dense=["abc"] + ["0"] * 12), "2 (I1)", "'abc'"),
    (criteo_line(dense=["0"] * 12 + ["1" * 25]), "14 (I13)", "'" + "1" * 25 + "'"),
    (criteo_line(cats=["00000000", "zzzzzzzz"] + ["00000001"] * 24), "16 (C2)", "'zzzzzzzz'"),
    (criteo_line(cats=["12345g78"] + ["00000001"] * 25), "15 (C1)", "'12345g78'"),
    (criteo_line(label="2"), "1 (label)", "'2'"),
    (criteo_line(label=""), "1 (label)", "''"),
    ("", "", "expected 40 fields, got 1"),
]
BAD_AVAZU = [
    (avazu_line(hour="14102124"), "3 (hour)", "'14102124'"),
    (avazu_line(hour="14133100"), "3 (hour)", "'14133100'"),
    (avazu_line(hour="14023000"), "3 (hour)", "'14023000'"),
    (avazu_line(hour="1410210"), "3 (hour)", "'1410210'"),
    (avazu_line(click="2"), "2 (click)", "'2'"),
    (avazu_line(site_id="xyz"), "6 (site_id)", "'xyz'"),
    (avazu_line(C1="10a5"), "4 (C1)", "'10a5'"),
    (avazu_line(id="12a"), "1 (id)", "'12a'"),
    (avazu_line() + ",7", "", "expected 24 fields, got 25"),
]


def _bad_case_file(tmp_path: Path, fmt: str, bad: str) -> Path:
    if fmt == "criteo":
        return write(tmp_path / "train.txt", [GOOD_C, GOOD_C, bad, GOOD_C])
    return write(tmp_path / "train.csv", [avazu_line(), avazu_line(), bad, avazu_line()],
                 header=",".join(F.AVAZU_HEADER))


@pytest.mark.parametrize("fmt,bad,column,value", [("criteo", *c) for c in BAD_CRITEO] + [("avazu", *c) for c in BAD_AVAZU])
def test_bad_row_fail_names_file_line_column_value(tmp_path, fmt, bad, column, value):
    src = _bad_case_file(tmp_path, fmt, bad)
    out = tmp_path / "out"
    with pytest.raises(PrepareError) as exc:
        prepare(cfg(fmt, [src], out, eval_fraction=0.25))
    err = str(exc.value)
    line = 3 if fmt == "criteo" else 4  # avazu: the header is line 1
    assert f"{src}:{line}:" in err
    if column:
        assert f"column {column}:" in err
    else:
        assert "column " not in err
    assert value in err
    assert no_leftovers(out)


@pytest.mark.parametrize("fmt,bad,column,value", [("criteo", *BAD_CRITEO[0]), ("criteo", *BAD_CRITEO[5]),
                                                  ("avazu", *BAD_AVAZU[0]), ("avazu", *BAD_AVAZU[6])])
def test_bad_row_skip_counts_it(tmp_path, fmt, bad, column, value):
    src = _bad_case_file(tmp_path, fmt, bad)
    out = tmp_path / "out"
    meta = prepare(cfg(fmt, [src], out, on_bad_row="skip")).meta
    assert meta["rows"] == 3 and meta["bad_rows"] == 1
    ex = meta["bad_row_examples"][0]
    assert ex["file"] == str(src) and ex["line"] == (3 if fmt == "criteo" else 4) and ex["column"] == column
    if column:
        assert repr(ex["value"]) == value
    else:
        assert ex["reason"] == value and ex["value"] == bad[:200]
    assert json.loads((out / "meta.json").read_text())["bad_rows"] == 1


def test_prepare_cli_exit_code_and_message(tmp_path):
    src = _bad_case_file(tmp_path, "criteo", BAD_CRITEO[5][0])
    out = tmp_path / "out"
    args = ["data", "prepare", "--format", "criteo", "--input", str(src), "--out", str(out)]
    r = subprocess.run([sys.executable, "-m", "bagpipe", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"{src}:3: column 16 (C2): not a hex string" in r.stderr and "'zzzzzzzz'" in r.stderr
    assert no_leftovers(out)
    r = subprocess.run([sys.executable, "-m", "bagpipe", *args, "--on-bad-row", "skip"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "1 bad rows skipped" in r.stdout and f"{src}:3" in r.stderr  # quoted in the log
    assert json.loads((out / "meta.json").read_text())["bad_rows"] == 1


def test_bad_row_deep_in_a_large_file(tmp_path, criteo_raw):
    # a bad row in a later block: the line number is still exact, and nothing is left behind
    lines = criteo_raw.read_text().splitlines()[:20_000]
    lines[17_345] = lines[17_345].replace("\t", "\tx", 1)
    src = write(tmp_path / "big.txt", lines)
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=rf"big.txt:17346: column 2 \(I1\)"):
        prepare(cfg("criteo", [src], out, block_bytes=64 << 10, rows_per_group=500))
    assert no_leftovers(out)
    meta = prepare(cfg("criteo", [src], out, block_bytes=64 << 10, on_bad_row="skip")).meta
    assert meta["bad_rows"] == 1 and meta["rows"] == 19_999
    assert meta["bad_row_examples"][0]["line"] == 17_346


def test_failure_keeps_the_previous_output(tmp_path):
    good = write(tmp_path / "good.txt", [GOOD_C] * 3)
    bad = write(tmp_path / "bad.txt", [GOOD_C, "oops"])
    out = tmp_path / "out"
    prepare(cfg("criteo", [good], out))
    before = (out / "meta.json").read_text()
    with pytest.raises(PrepareError, match="bad.txt:2"):
        prepare(cfg("criteo", [bad], out, replace=True))
    assert (out / "meta.json").read_text() == before
    assert not list(tmp_path.glob(".out.*"))


# ---------------------------------------------------------------- gzip and empty inputs


def test_gzip_input_matches_plain(tmp_path, criteo_raw):
    gz = tmp_path / "train.txt.gz"
    gz.write_bytes(gzip.compress(head(criteo_raw, 2_000_000)))
    plain = tmp_path / "train.txt"
    plain.write_bytes(head(criteo_raw, 2_000_000))
    a = prepare(cfg("criteo", [plain], tmp_path / "a", hash_buckets=1000)).meta
    b = prepare(cfg("criteo", [gz], tmp_path / "b", hash_buckets=1000)).meta
    assert a["rows"] == b["rows"] > 0 and a["content_hash"] == b["content_hash"]


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_broken_gzip_names_the_file(tmp_path, criteo_raw, damage):
    data = gzip.compress(head(criteo_raw, 500_000))
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        mid = len(data) // 2
        data = data[:mid] + bytes(b ^ 0x5A for b in data[mid:mid + 64]) + data[mid + 64:]
    src = tmp_path / "day_0.gz"
    src.write_bytes(data)
    out = tmp_path / "out"
    for fraction in (0.0, 0.1):  # with and without the counting pass
        with pytest.raises(PrepareError, match=r"day_0\.gz: corrupt or truncated gzip"):
            prepare(cfg("criteo", [src], out, eval_fraction=fraction))
        assert no_leftovers(out)


@pytest.mark.parametrize("fmt,content", [("criteo", b""), ("criteo.gz", gzip.compress(b"")),
                                         ("avazu", (",".join(F.AVAZU_HEADER) + "\n").encode())])
def test_empty_input_names_the_file(tmp_path, fmt, content):
    src = tmp_path / "empty_file"
    src.write_bytes(content)
    out = tmp_path / "out"
    good = write(tmp_path / "good.txt", [GOOD_C])
    inputs = [src] if fmt.startswith("avazu") else [good, src]
    for fraction in (0.0, 0.1):
        with pytest.raises(PrepareError, match=r"empty_file: empty input"):
            prepare(cfg(fmt.split(".")[0], inputs, out, eval_fraction=fraction))
        assert no_leftovers(out)


def test_missing_input_and_bad_header(tmp_path):
    with pytest.raises(PrepareError, match="nope.txt: no such file"):
        prepare(cfg("criteo", [tmp_path / "nope.txt"], tmp_path / "out"))
    src = write(tmp_path / "a.csv", [avazu_line()], header="id,click,hour")
    with pytest.raises(PrepareError, match=r"a.csv:1: expected the Avazu header"):
        prepare(cfg("avazu", [src], tmp_path / "out"))


def test_config_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="eval_fraction"):
        cfg("criteo", ["x"], tmp_path, eval_fraction=1.0)
    with pytest.raises(ValueError, match="hash_buckets / min_frequency"):
        cfg("criteo", ["x"], tmp_path, hash_buckets=10, min_frequency=2)
    with pytest.raises(ValueError, match="rows_per_group"):
        cfg("criteo", ["x"], tmp_path, rows_per_group=0)
    with pytest.raises(ValueError, match="files"):
        SynthConfig("criteo", 10, tmp_path, files=11)


# ---------------------------------------------------------------- synth


def test_synth_is_deterministic_and_files_cut_one_stream(tmp_path):
    a, b, c, g = (tmp_path / x for x in "abcg")
    synthesise(SynthConfig("criteo", 70_000, a, seed=5))
    synthesise(SynthConfig("criteo", 70_000, b, seed=5))
    synthesise(SynthConfig("criteo", 70_000, c, seed=5, files=3))
    synthesise(SynthConfig("criteo", 70_000, g, seed=5, files=3, gzip=True))
    whole = (a / "train.txt").read_bytes()
    assert whole == (b / "train.txt").read_bytes()
    parts = [(c / f"day_{k}").read_bytes() for k in range(3)]
    assert b"".join(parts) == whole
    assert [len(p.splitlines()) for p in parts] == [23_333, 23_333, 23_334]
    assert [gzip.decompress((g / f"day_{k}.gz").read_bytes()) for k in range(3)] == parts
    synthesise(SynthConfig("criteo", 70_000, b, seed=6))
    assert (b / "train.txt").read_bytes() != whole
    assert not list(a.glob(".*"))  # no temporary files left


def test_synth_criteo_format(criteo_raw):
    lines = criteo_raw.read_text().splitlines()
    assert len(lines) == ROWS
    rows = [ln.split("\t") for ln in lines]
    assert all(len(r) == 40 for r in rows)
    assert {r[0] for r in rows} == {"0", "1"}
    assert all(re.fullmatch(r"(-?[0-9]+)?", x) for r in rows for x in r[1:14])
    assert all(re.fullmatch(r"([0-9a-f]{8})?", x) for r in rows for x in r[14:])
    assert any(r[2].startswith("-") for r in rows)  # I2's small negatives
    for j, rate in enumerate(F.CRITEO_DENSE_MISSING):
        assert abs(sum(r[1 + j] == "" for r in rows) / ROWS - rate) < 0.02
    ctr = sum(r[0] == "1" for r in rows) / ROWS
    assert 0.22 < ctr < 0.29
    # C9 has 3 values in the real data; the large features have many
    assert len({r[14 + 8] for r in rows}) <= 3 and len({r[14 + 2] for r in rows}) > 2000


def test_synth_avazu_format(tmp_path):
    synthesise(SynthConfig("avazu", 5000, tmp_path, seed=1, files=2))
    for k in range(2):
        lines = (tmp_path / f"train_{k}.csv").read_text().splitlines()
        assert lines[0] == ",".join(F.AVAZU_HEADER)
        rows = [ln.split(",") for ln in lines[1:]]
        assert len(rows) == 2500 and all(len(r) == 24 for r in rows)
        col = {c: [r[i] for r in rows] for i, c in enumerate(F.AVAZU_HEADER)}
        assert all(re.fullmatch(r"[0-9]{1,20}", x) and int(x) < 2**64 for x in col["id"])
        assert set(col["click"]) == {"0", "1"}
        hours = [int(x) for x in col["hour"]]
        assert hours == sorted(hours) and 14102100 <= hours[0] and hours[-1] <= 14103023
        for c in F.AVAZU_HEX_COLUMNS:
            assert all(re.fullmatch(r"[0-9a-f]{8}", x) for x in col[c])
        for c in set(F.AVAZU_CAT_COLUMNS) - F.AVAZU_HEX_COLUMNS:
            assert all(re.fullmatch(r"-?[0-9]+", x) for x in col[c])
            assert len(set(col[c])) <= F.AVAZU_CARDINALITIES[c]
        assert set(col["C1"]) <= {"1005", "1002", "1010", "1012", "1007", "1001", "1008"}


def test_synth_skew_top_rows_take_most_lookups(tmp_path):
    report = synthesise(SynthConfig("criteo", 200_000, tmp_path, seed=0))
    assert report.top1pct_share > 0.80
    assert 0.75 < report.bayes_auc < 0.85
    # the same holds for the row ids of the prepared data, as the cache sees them
    out = tmp_path / "prep"
    prepare(cfg("criteo", [tmp_path / "train.txt"], out, hash_buckets=10_000_000))
    _, _, sparse = all_rows(out)
    keys = (np.arange(26, dtype=np.int64)[None, :] << 40) | sparse
    counts = np.sort(np.unique(keys, return_counts=True)[1])[::-1]
    top = counts[: int(np.ceil(0.01 * len(counts)))].sum() / counts.sum()
    assert top > 0.80


def test_synth_cli_reports_skew(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bagpipe", "data", "synth", "--format", "avazu", "--rows", "2000",
                        "--out", str(tmp_path), "--gzip"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert re.search(r"top 1% of rows take [0-9.]+% of lookups", r.stdout)
    assert gzip.decompress((tmp_path / "train.csv.gz").read_bytes()).startswith(b"id,click,hour,")


# ---------------------------------------------------------------- reader


def test_meta_and_reader_shapes(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    for key in ("rows", "eval_rows", "bad_rows", "bad_row_examples", "num_dense", "tables", "format",
                "params", "inputs", "content_hash", "version"):
        assert key in meta
    assert meta["rows"] == 27_000 and meta["eval_rows"] == 3000
    for f in meta["files"]["train"]:
        md = pq.ParquetFile(prepared / f).metadata
        assert {md.row_group(i).num_rows for i in range(md.num_row_groups)} == {1000}
    ds = Dataset(prepared)
    assert ds.num_dense == 13 and len(ds.tables) == 26 and ds.tables[0][0] == "cat_0"
    r = ds.batches(96, seed=1, world_size=3, rank=2)
    assert len(r) == 27_000 // 96
    b = r[5]
    assert b.iteration == 5
    assert b.dense.shape == (32, 13) and b.dense.dtype == np.float32 and b.dense.flags.c_contiguous
    assert b.labels.shape == (32,) and b.labels.dtype == np.float32
    assert b.sparse.shape == (32, 26) and b.sparse.dtype == np.int64 and b.sparse.flags.c_contiguous
    s = ds.sparse_batches(96, seed=1)[5]
    assert s.shape == (96, 26) and s.dtype == np.int64


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 100), st.sampled_from([1, 2, 3]), st.integers(0, 2**32), st.integers(0, 3), st.booleans(),
       st.integers(1, 5))
def test_rank_slices_concatenate_to_the_sparse_view(prepared, units, world, seed, epoch, shuffle, window_groups):
    ds = Dataset(prepared)
    batch = 6 * units
    window = 1000 * window_groups
    sparse = ds.sparse_batches(batch, seed, epoch, shuffle, shuffle_window_rows=window)
    ranks = [ds.batches(batch, seed, epoch, shuffle, world, r, shuffle_window_rows=window) for r in range(world)]
    n = len(sparse)
    assert all(len(r) == n for r in ranks)
    for i in sorted({0, 1, n // 3, n // 2, n - 1}):
        parts = [r[i] for r in ranks]
        assert np.array_equal(np.concatenate([p.sparse for p in parts]), sparse[i])
        assert all(p.iteration == i for p in parts)


def test_epoch_is_a_permutation_of_the_rows(prepared):
    labels, dense, sparse = all_rows(prepared)
    ds = Dataset(prepared)
    want = sorted(fingerprints(labels, dense, sparse))
    assert len(set(want)) == len(want)
    for shuffle in (True, False):
        r = ds.batches(1000, seed=7, shuffle=shuffle, shuffle_window_rows=4000)
        got = [r[i] for i in range(len(r))]
        fp = fingerprints(*(np.concatenate([getattr(b, a) for b in got]) for a in ("labels", "dense", "sparse")))
        assert sorted(fp) == want
        if not shuffle:  # file order
            assert np.array_equal(np.concatenate([b.sparse for b in got]), sparse)


def test_shuffle_is_deterministic_and_depends_on_seed_and_epoch(prepared):
    ds = Dataset(prepared)

    def order(**kw):
        r = ds.sparse_batches(500, shuffle_window_rows=3000, **kw)
        return np.concatenate([r[i] for i in (0, 1, len(r) - 1)])

    base = order(seed=1, epoch=0)
    assert np.array_equal(base, order(seed=1, epoch=0))
    assert np.array_equal(base[:500], Dataset(prepared).sparse_batches(500, seed=1, shuffle_window_rows=3000)[0])
    assert not np.array_equal(base, order(seed=2, epoch=0))
    assert not np.array_equal(base, order(seed=1, epoch=1))
    assert not np.array_equal(base, order(seed=1, epoch=0, shuffle=False))


def test_epochs_follow_one_another_each_in_its_own_order(prepared):
    ds = Dataset(prepared)
    one = [ds.sparse_batches(500, seed=4, epoch=e, shuffle_window_rows=3000) for e in (1, 2, 3)]
    run = ds.sparse_batches(500, seed=4, epoch=1, shuffle_window_rows=3000, epochs=3)
    ranks = ds.batches(500, seed=4, epoch=1, world_size=2, rank=1, shuffle_window_rows=3000, epochs=3)
    n = len(one[0])
    assert len(run) == len(ranks) == 3 * n
    for i in (0, n - 1, n, 2 * n + 1, 3 * n - 1, -1):
        e, j = divmod(i % (3 * n), n)
        assert np.array_equal(run[i], one[e][j]), i
        assert np.array_equal(ranks[i].sparse, one[e][j][250:]), i
        assert run.epoch_of(i % (3 * n)) == 1 + e
    assert not np.array_equal(run[0], run[n])
    with pytest.raises(IndexError, match="3 epochs of"):
        run[3 * n]


def test_small_dataset_is_fully_permuted(prepared):
    # one window holds everything: the first batch draws from the whole split
    ds = Dataset(prepared)
    first = ds.sparse_batches(3000, seed=3)[0]
    _, _, sparse = all_rows(prepared)
    index = {row.tobytes(): i for i, row in enumerate(sparse)}
    positions = np.array([index[row.tobytes()] for row in first])
    assert positions.min() < 1000 and positions.max() > 26_000


_CHILD = """
import hashlib, sys
from bagpipe.dataset import Dataset
ds = Dataset(sys.argv[1])
h = hashlib.sha256()
r = ds.batches(120, seed=11, epoch=2, world_size=2, rank=1, shuffle_window_rows=5000)
for i in (0, 7, len(r) - 1):
    b = r[i]
    h.update(b.dense.tobytes() + b.labels.tobytes() + b.sparse.tobytes())
s = ds.sparse_batches(120, seed=11, epoch=2, shuffle_window_rows=5000)
for i in (3, len(s) - 2):
    h.update(s[i].tobytes())
print(h.hexdigest())
"""


def test_batches_identical_across_processes(prepared):
    outs = [subprocess.run([sys.executable, "-c", _CHILD, str(prepared)], cwd=ROOT, capture_output=True, text=True,
                           timeout=60) for _ in range(2)]
    assert all(o.returncode == 0 for o in outs), outs[0].stderr
    assert outs[0].stdout == outs[1].stdout and len(outs[0].stdout.strip()) == 64


def test_eval_split_is_the_last_rows_and_disjoint(prepared, criteo_raw):
    ds = Dataset(prepared)
    ev = ds.batches(100, shuffle=False, split="eval")
    assert ds.num_rows("eval") == 3000 and len(ev) == 30
    labels = np.concatenate([ev[i].labels for i in range(len(ev))])
    raw = [float(ln.split("\t", 1)[0]) for ln in criteo_raw.read_text().splitlines()[-3000:]]
    assert labels.tolist() == raw
    train = set(fingerprints(*all_rows(prepared, "train")))
    evs = set(fingerprints(*all_rows(prepared, "eval")))
    assert not train & evs and len(evs) == 3000


def test_sequential_reads_load_each_window_once(prepared, monkeypatch):
    ds = Dataset(prepared)
    r = ds.batches(700, seed=2, shuffle_window_rows=4000)
    loads = []
    original = r.stream._load
    monkeypatch.setattr(r.stream, "_load", lambda w: loads.append(w) or original(w))
    for i in range(len(r)):
        r[i]
    assert sorted(loads) == list(range(len(r.stream.windows)))
    assert len(r.stream.cache) <= 2


def test_reader_errors(prepared, tmp_path):
    ds = Dataset(prepared)
    r = ds.batches(100)
    with pytest.raises(IndexError, match=r"batch 270 out of range: the train split has 270 full batches"):
        r[270]
    with pytest.raises(IndexError):
        ds.sparse_batches(100)[-271]
    assert r[-1].iteration == 269
    with pytest.raises(ValueError, match="world_size"):
        ds.batches(100, world_size=3)
    with pytest.raises(ValueError, match="split"):
        ds.batches(100, split="test")
    with pytest.raises(DatasetError, match="meta.json is missing"):
        Dataset(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        Dataset(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"version": 1}))
    with pytest.raises(DatasetError, match="'format' is missing"):
        Dataset(tmp_path)


def test_prepare_is_deterministic(tmp_path, criteo_raw):
    src = tmp_path / "x.txt"
    src.write_bytes(head(criteo_raw, 1_000_000))
    a = prepare(cfg("criteo", [src], tmp_path / "a", eval_fraction=0.2)).meta
    b = prepare(cfg("criteo", [src], tmp_path / "b", eval_fraction=0.2)).meta
    assert a["content_hash"] == b["content_hash"]
    h = hashlib.sha256()
    for split in ("train", "eval"):
        for f in a["files"][split]:
            h.update(f.encode() + b"\0" + (tmp_path / "a" / f).read_bytes())
    assert a["content_hash"] == "sha256:" + h.hexdigest()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 40), st.booleans()), max_size=30), min_size=1, max_size=12),
       st.integers(1, 3))
def test_vocabulary_matches_a_counter(chunks, min_frequency):
    from collections import Counter

    from data.prepare import ValueCounts, VocabEncoder

    counts = ValueCounts()
    counts.MERGE_MIN = 4  # merge often
    seen: Counter = Counter()
    for chunk in chunks:
        values = np.array([v * 0x9E3779B1 for v, _ in chunk], dtype=np.uint64)
        missing = np.array([m for _, m in chunk], dtype=bool)
        counts.add(values, missing)
        seen.update(None if m else int(v) for v, m in zip(values, missing))
    enc = VocabEncoder([counts], min_frequency)
    kept = sorted((k for k, c in seen.items() if c >= min_frequency), key=lambda k: (-seen[k], k is not None, k or 0))
    ids = {k: i + 1 for i, k in enumerate(kept)}
    probe = sorted(set(seen) | {12345}, key=lambda k: (k is not None, k or 0))
    values = np.array([0 if k is None else k for k in probe], dtype=np.uint64)
    missing = np.array([k is None for k in probe])
    got = enc.encode(values[None, :], missing[None, :])[0]
    assert got.tolist() == [ids.get(k, 0) for k in probe]
    assert enc.sizes == [1 + len(kept)]


@pytest.mark.parametrize("fmt", ["criteo", "avazu"])
def test_eval_boundary_across_files(tmp_path, fmt):
    # two files of 10 rows; the last 60% of the 20 rows (12) are eval: rows 8.. of the stream
    files = []
    for k in range(2):
        rows = range(10 * k, 10 * k + 10)
        if fmt == "criteo":
            lines = [criteo_line(dense=[str(i)] + ["0"] * 12) for i in rows]
            files.append(write(tmp_path / f"day_{k}", lines))
        else:
            lines = [avazu_line(hour=f"141021{i:02d}") for i in rows]
            files.append(write(tmp_path / f"train_{k}.csv", lines, header=",".join(F.AVAZU_HEADER)))
    out = tmp_path / "out"
    meta = prepare(cfg(fmt, files, out, eval_fraction=0.6, rows_per_group=3)).meta
    assert meta["rows"] == 8 and meta["eval_rows"] == 12

    def index(split):
        d = read_split(out, split)["dense_0"]
        return [round(math.expm1(x)) for x in d] if fmt == "criteo" else [round(x * 23) for x in d]

    assert index("train") == list(range(8)) and index("eval") == list(range(8, 20))
    assert Dataset(out).num_rows("eval") == 12
