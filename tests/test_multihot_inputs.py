"""Multi-hot inputs of `bagpipe data prepare`: MLPerf's materialized days (`--format mlperf-npz`) and text
with a separator inside a field (`--bag-separator`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bagpipe.dataset import PAD, Dataset
from data.mlperf import write_day

REPO = Path(__file__).resolve().parent.parent
BAGS = (3, 1, 2, 1)
SIZES = (50, 7, 1000, 3)


def _day(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    labels = rng.integers(0, 2, rows)
    dense = rng.normal(size=(rows, 13)).astype(np.float32)
    ids = [rng.integers(0, size, (rows, bag)) for size, bag in zip(SIZES, BAGS)]
    return labels, dense, ids


def _prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bagpipe", "data", "prepare", "--format", "mlperf-npz", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture
def two_days(tmp_path) -> tuple[list[Path], list[tuple]]:
    rng = np.random.default_rng(5)
    days = [_day(rng, 700), _day(rng, 500)]
    return [write_day(tmp_path / "mlperf", d, *day) for d, day in enumerate(days)], days


def test_two_days_become_one_dataset_row_for_row(two_days, tmp_path):
    """Every label, dense value and id lands in order, days concatenated, the last rows as eval."""
    npz, days = two_days
    out = tmp_path / "prepared"
    r = _prepare("--input", *map(str, npz), "--out", str(out), "--eval-fraction", "0.1", "--rows-per-group", "256",
                 "--num-embeddings", ",".join(map(str, SIZES)))
    assert r.returncode == 0, r.stderr
    ds = Dataset(out)
    assert ds.bags == list(BAGS) and list(ds.table_sizes) == list(SIZES) and ds.num_dense == 13
    assert (ds.num_rows("train"), ds.num_rows("eval")) == (1080, 120)
    labels = np.concatenate([d[0] for d in days])
    dense = np.concatenate([d[1] for d in days])
    ids = np.concatenate([np.concatenate(d[2], axis=1) for d in days])  # [rows, sum(bags)]
    for split, rows in (("train", slice(0, 1080)), ("eval", slice(1080, 1200))):
        reader = ds.batches(40 if split == "eval" else 120, shuffle=False, split=split)
        got = [reader[i] for i in range(len(reader))]
        assert np.array_equal(np.concatenate([b.labels for b in got]), labels[rows].astype(np.float32))
        assert np.array_equal(np.concatenate([b.dense for b in got]), dense[rows])
        sparse = np.concatenate([b.sparse for b in got])
        assert np.array_equal(sparse, ids[rows]) and not (sparse == PAD).any()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "mlperf-npz" and meta["params"]["num_embeddings"] == "given"


def test_table_sizes_default_to_the_largest_id(two_days, tmp_path):
    npz, days = two_days
    r = _prepare("--input", *map(str, npz), "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    want = [int(max(d[2][t].max() for d in days)) + 1 for t in range(len(BAGS))]
    assert list(Dataset(tmp_path / "p").table_sizes) == want


def test_bad_input_is_named_by_file_array_and_row(tmp_path):
    rng = np.random.default_rng(1)
    labels, dense, ids = _day(rng, 300)
    ids[2][217, 1] = 1000  # table 2 has 1000 rows: ids 0..999
    npz = write_day(tmp_path / "m", 3, labels, dense, ids)
    out = tmp_path / "p"
    r = _prepare("--input", str(npz), "--out", str(out), "--num-embeddings", ",".join(map(str, SIZES)))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{npz} array '2': row 217, position 1: id 1000 is outside the table (table 2 has 1000 rows" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".p.tmp-*"))  # nothing half written

    labels[5] = 2
    npz = write_day(tmp_path / "m2", 0, labels, dense, [a % s for a, s in zip(ids, SIZES)])
    r = _prepare("--input", str(npz), "--out", str(out))
    assert r.returncode == 1 and "day_0_labels.npy: row 5: label 2 is not 0 or 1" in r.stderr, r.stderr

    (tmp_path / "m2" / "day_0_dense.npy").unlink()
    r = _prepare("--input", str(npz), "--out", str(out))
    assert r.returncode == 1 and "day_0_dense.npy is missing beside it" in r.stderr, r.stderr

    np.savez(tmp_path / "m" / "day_3_sparse_multi_hot.npz", **{"0": ids[0], "1": ids[1][:299]})
    r = _prepare("--input", str(tmp_path / "m" / "day_3_sparse_multi_hot.npz"), "--out", str(out))
    assert r.returncode == 1 and "array '1': 299 rows, but day_3_labels.npy has 300" in r.stderr, r.stderr

    r = _prepare("--input", str(npz), "--out", str(out), "--hash-buckets", "10")
    assert r.returncode == 2 and "--hash-buckets: not for --format mlperf-npz" in r.stderr
    r = _prepare("--input", str(npz), "--out", str(out), "--bags", "3")
    assert r.returncode == 2 and "--bags: not for --format mlperf-npz" in r.stderr


def test_a_truncated_member_is_refused(tmp_path):
    rng = np.random.default_rng(2)
    npz = write_day(tmp_path / "m", 0, *_day(rng, 100))
    # A stored .npy member cut short: rewrite the zip with member '0' missing its last rows.
    import zipfile
    with zipfile.ZipFile(npz) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["0.npy"] = members["0.npy"][:-40]
    with zipfile.ZipFile(npz, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    r = _prepare("--input", str(npz), "--out", str(tmp_path / "p"), "--rows-per-group", "32")
    assert r.returncode == 1 and "array '0': ends at row" in r.stderr and "(truncated)" in r.stderr, r.stderr


# ------------------------------------------------------------ text with a separator inside a field


def _text_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bagpipe", "data", "prepare", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _bag_lines(rng: np.random.Generator, rows: int, most: int) -> list[list[list[str]]]:
    """Criteo-like rows: label, 13 integers, 26 bags of 0..most hex ids (repeats included)."""
    out = []
    for _ in range(rows):
        cats = [[f"{v:x}" for v in rng.integers(0, 40, rng.integers(0, most + 1))] for _ in range(26)]
        out.append([[str(rng.integers(0, 2))]] + [[str(rng.integers(-2, 500))] for _ in range(13)] + cats)
    return out


def _write_text(path: Path, rows: list[list[list[str]]]) -> Path:
    path.write_text("".join("\t".join(",".join(f) for f in r) + "\n" for r in rows))
    return path


def test_bags_in_text_fields_hash_as_one_hot_ids_do(tmp_path):
    """Every id of a bag gets the id one-hot text gives the same value in the same column, in order;
    an empty field is an empty bag (a table of bag 1 keeps the missing id 0)."""
    from data import formats as F

    rng = np.random.default_rng(9)
    rows = _bag_lines(rng, 600, 4)
    bags = [4] * 25 + [1]
    for r in rows:
        r[-1] = r[-1][:1]
    raw = _write_text(tmp_path / "bags.txt", rows)
    out = tmp_path / "p"
    r = _text_prepare("--format", "criteo", "--input", str(raw), "--out", str(out), "--hash-buckets", "5000",
                      "--bag-separator", ",", "--bags", ",".join(map(str, bags)), "--eval-fraction", "0",
                      "--rows-per-group", "128")
    assert r.returncode == 0, r.stderr
    ds = Dataset(out)
    assert ds.bags == bags and ds.num_rows() == 600
    sizes = ds.table_sizes
    got = np.concatenate([b.sparse for b in (lambda rd: [rd[i] for i in range(len(rd))])(ds.batches(100, shuffle=False))])
    col = 0
    for t, bag in enumerate(bags):
        for i, row in enumerate(rows):
            values = np.array([int(v, 16) for v in row[14 + t]], dtype=np.uint64)
            want = F.hashed_ids(values, np.zeros(len(values), bool), t, int(sizes[t]))
            if bag == 1:
                want = want if len(values) else np.array([0])
            cell = got[i, col:col + bag]
            assert list(cell[:len(want)]) == list(want) and (cell[len(want):] == PAD).all(), (i, t)
        col += bag


def test_one_hot_text_read_with_a_separator_and_bags_of_one_equals_plain_prepare(small_criteo, tmp_path):
    raw = sorted((small_criteo.parent / "raw").iterdir())
    common = ["--format", "criteo", "--input", *map(str, raw), "--hash-buckets", "2000", "--eval-fraction", "0.05"]
    r = _text_prepare(*common, "--out", str(tmp_path / "bags"), "--bag-separator", ",", "--bags", "1")
    assert r.returncode == 0, r.stderr
    plain, bagged = Dataset(small_criteo), Dataset(tmp_path / "bags")
    for split in ("train", "eval"):
        a, b = plain.batches(1000, shuffle=False, split=split), bagged.batches(1000, shuffle=False, split=split)
        assert len(a) == len(b)
        for i in range(len(a)):
            assert np.array_equal(a[i].sparse, b[i].sparse) and np.array_equal(a[i].dense, b[i].dense)


def test_bad_bags_are_named_by_file_line_and_column(tmp_path):
    rng = np.random.default_rng(4)
    rows = _bag_lines(rng, 50, 3)
    cases = [("a,,b", "an empty id inside a bag"), ("a,", "an empty id inside a bag"),
             ("1,2,3,4", "more ids in the bag than --bags allows"), ("a,xyz", "a bag's id does not parse")]
    for k, (field, reason) in enumerate(cases):
        bad = [list(map(list, r)) for r in rows]
        bad[17][14 + 5] = field.split(",")
        raw = _write_text(tmp_path / f"bad{k}.txt", bad)
        r = _text_prepare("--format", "criteo", "--input", str(raw), "--out", str(tmp_path / f"o{k}"),
                          "--bag-separator", ",", "--bags", "3")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"{raw}:18: column 20 (C6): {reason}" in r.stderr and repr(field) in r.stderr, r.stderr
        assert not (tmp_path / f"o{k}").exists()
    r = _text_prepare("--format", "criteo", "--input", str(raw), "--out", str(tmp_path / "x"),
                      "--bag-separator", "\t", "--bags", "3")
    assert r.returncode == 2 and "--bag-separator: one ASCII character" in r.stderr, r.stderr
    r = _text_prepare("--format", "criteo", "--input", str(raw), "--out", str(tmp_path / "x"), "--bag-separator", ",")
    assert r.returncode == 2 and "give both" in r.stderr, r.stderr
