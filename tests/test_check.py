"""`bagpipe check --matrix small` is part of `make test`: every variation equals the reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bagpipe.runner.check import main as check_main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_small_matrix_passes_and_catches_every_mutant_and_fault(small_criteo, tmp_path, capsys):
    out_json = tmp_path / "check.json"
    rc = check_main(["--config", str(REPO / "configs" / "check.toml"), "--set", f"data={small_criteo}",
                     "--work-dir", str(tmp_path / "work"), "--json", str(out_json)])
    table = capsys.readouterr().out
    results = json.loads(out_json.read_text())
    failed = [r["variation"] for r in results if not r["passed"]]
    assert rc == 0 and not failed, f"{failed}\n{table}"
    by_name = {r["variation"]: r for r in results}
    # Every policy ran with one trainer and matched the reference bit for bit.
    for policy in ("none", "lru", "lfu", "lru-prefetch", "static", "bagpipe", "bagpipe-original"):
        row = by_name[f"policy={policy}"]
        assert row["exact"] and row["rows"] > 0 and max(row["max_abs"].values()) == 0.0
    # The base data made multi-hot (empty bags, repeated ids), summed and averaged, bit for bit.
    for name in ("bagpipe multi-hot sum", "lru multi-hot mean"):
        row = by_name[name]
        assert row["exact"] and row["rows"] > 0 and max(row["max_abs"].values()) == 0.0, row
    # The planted mutants were caught by the comparison (they trained, wrongly), not by luck.
    mutants = [r for r in results if r["mutant"]]
    assert len(mutants) == 2 and all(r["passed"] for r in mutants)
    assert "caught" in table and "MUTANT NOT CAUGHT" not in table
    # Faults that must stop the job did, with the reason; the harmless ones left the model intact.
    stopped = [r for r in results if r.get("fault") and r.get("error")]
    assert {r["fault"] for r in stopped} == {"plan-duplicate", "plan-reorder", "plan-drop", "plan-corrupt"}
    for name in ("FAULT plan delayed 2s", "FAULT write-back lands after the next fetch"):
        assert by_name[name]["rows"] > 0 and not by_name[name].get("error")
