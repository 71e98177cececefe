"""`bagpipe check`: every variation equals `local` of the same trainer count bit for bit.

The fast test runs a few variations on one dataset; `make test` adds the small
matrix on the shared fixture; the small matrix on synthetic Criteo seeds 1, 2, 3
and synthetic Avazu at 200 iterations, and the full matrix, are marked
``extended`` and run with `make test-extended`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bagpipe.runner.check import auc_standard_error, identical
from bagpipe.runner.check import main as check_main

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "check.toml")


def _prepared(root: Path, fmt: str, seed: int) -> Path:
    """Made through the commands a user runs: ``bagpipe data synth`` then ``prepare``."""
    from data.prepare import main as prepare
    from data.synth import main as synth

    assert synth(["--format", fmt, "--rows", "40000", "--out", str(root / "raw"), "--seed", str(seed),
                  "--files", "2"]) == 0
    inputs = sorted(str(p) for p in (root / "raw").iterdir())
    assert prepare(["--format", fmt, "--input", *inputs, "--out", str(root / "prepared"),
                    "--hash-buckets", "2000", "--eval-fraction", "0.05"]) == 0
    return root / "prepared"


def _check(data: Path, work: Path, capsys, *extra: str) -> tuple[int, list[dict], str]:
    out_json = work / "check.json"
    rc = check_main(["--config", CONFIG, "--set", f"data={data}", "--work-dir", str(work / "runs"),
                     "--json", str(out_json), *extra])
    table = capsys.readouterr().out
    return rc, json.loads(out_json.read_text()), table


def test_identical_is_every_bit():
    import torch

    model = {"dense": {"w": torch.tensor([1.0, 2.0])},
             "tables": {"t": {"ids": torch.tensor([3]), "weights": torch.ones(1, 4), "state": torch.zeros(1, 1)}}}
    same = {"dense": {"w": torch.tensor([1.0, 2.0])},
            "tables": {"t": {"ids": torch.tensor([3]), "weights": torch.ones(1, 4), "state": torch.zeros(1, 1)}}}
    assert identical(model, same)
    # One last-bit difference in one row's optimizer state is a failure.
    same["tables"]["t"]["state"] = torch.nextafter(torch.zeros(1, 1), torch.ones(1, 1))
    assert not identical(model, same)


def test_auc_standard_error_shrinks_with_the_eval_set():
    small, large = auc_standard_error(0.75, 25, 75), auc_standard_error(0.75, 2500, 7500)
    assert 0.04 < small < 0.07 and abs(small / large - 10) < 0.5  # 1/sqrt(n)


def test_few_variations_on_criteo_bit_for_bit_and_a_mutant_caught(small_criteo, tmp_path, capsys):
    """Fast: three trainers against local with three (three ranks are where a ring all-reduce's
    order would show), the skip-sync mutant against local with two, and the drift rows."""
    rc, results, table = _check(small_criteo, tmp_path, capsys, "--iterations", "30", "--only", "bagpipe trainers=3",
                                "--only", "MUTANT skip", "--eval-rows", "1024")
    by_name = {r["variation"]: r for r in results}
    assert rc == 0, table
    row = by_name["bagpipe trainers=3"]
    assert row["passed"] and row["trainers"] == 3 and row["rows"] > 0 and max(row["max_abs"].values()) == 0.0
    assert by_name["MUTANT skip gradient combine"]["passed"]  # caught: its model differs
    for n in (2, 3):
        drift = by_name[f"DRIFT trainers={n} vs one process"]
        assert drift["passed"] and drift["auc_diff"] <= drift["bound"] and len(drift["eval_auc"]) == 2
        assert drift["bound"] < 0.2  # over 1024 eval samples the bound says something
    assert "Data-parallel drift" in table


def _small_matrix_passes(data: Path, tmp_path: Path, capsys, *extra: str) -> None:
    rc, results, table = _check(data, tmp_path, capsys, *extra)
    failed = [r["variation"] for r in results if not r["passed"]]
    assert rc == 0 and not failed, f"{failed}\n{table}"
    by_name = {r["variation"]: r for r in results}
    for policy in ("none", "lru", "lfu", "lru-prefetch", "static", "bagpipe", "bagpipe-original"):
        row = by_name[f"policy={policy}"]
        assert row["rows"] > 0 and max(row["max_abs"].values()) == 0.0
    for r in results:  # every cached variation that trained is identical to its reference
        if not r["mutant"] and not r.get("drift") and not r.get("error"):
            assert max(r["max_abs"].values()) == 0.0, r["variation"]
    for name in ("bagpipe multi-hot sum", "lru multi-hot mean"):  # the one-hot data's multi-hot twin
        row = by_name[name]
        assert row["rows"] > 0 and max(row["max_abs"].values()) == 0.0, row
    mutants = [r for r in results if r["mutant"]]
    assert len(mutants) == 2 and all(r["passed"] for r in mutants)
    stopped = [r for r in results if r.get("fault") and r.get("error")]
    assert {r["fault"] for r in stopped} == {"plan-duplicate", "plan-reorder", "plan-drop", "plan-corrupt"}
    assert {r["variation"] for r in results if r.get("drift")} == {"DRIFT trainers=2 vs one process",
                                                                    "DRIFT trainers=3 vs one process"}


@pytest.mark.slow
def test_small_matrix_passes(small_criteo, tmp_path, capsys):
    """In make test: the small matrix on the shared fixture at check.toml's own length."""
    _small_matrix_passes(small_criteo, tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize("fmt,seed", [("criteo", 1), ("criteo", 2), ("criteo", 3), ("avazu", 1)])
def test_small_matrix_on_data_nobody_tuned_to(fmt, seed, tmp_path, capsys):
    """make test-extended (about 10 minutes each here): 200 iterations on data nobody tuned to."""
    _small_matrix_passes(_prepared(tmp_path / "data", fmt, seed), tmp_path, capsys, "--iterations", "200",
                         "--set", "batch_size=96")


@pytest.mark.slow
@pytest.mark.extended
def test_full_matrix_passes(small_criteo, tmp_path, capsys):
    rc, results, table = _check(small_criteo, tmp_path, capsys, "--matrix", "full")
    failed = [r["variation"] for r in results if not r["passed"]]
    assert rc == 0 and not failed, f"{failed}\n{table}"
