"""``bagpipe bench``: the policies and the TorchRec peer side by side, and a sweep of one key."""

from __future__ import annotations

import json

import pytest

from bench.policies import main as bench_main

pytestmark = pytest.mark.slow


def test_sweep_reports_every_policy_the_peer_and_where_each_holds_local(small_criteo, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = bench_main(["--config", "configs/bench-quick.toml", "--set", f"data={small_criteo}",
                     "--set", "batch_size=256", "--set", "iterations=12", "--set", "cache_rows=3000",
                     "--set", "trainers=1", "--set", "eval_batches=1",
                     "--policies", "local,torchrec,bagpipe", "--repeats", "1", "--run-dir", str(out),
                     "--sweep", "store_latency_us=0,3000"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["key"] == "store_latency_us" and [p["value"] for p in report["points"]] == [0.0, 3000.0]
    for point in report["points"]:
        pols = point["policies"]
        assert set(pols) == {"local", "torchrec", "bagpipe"}
        assert all(r["samples_per_s"] > 0 for r in pols.values())
        assert pols["bagpipe"]["rows_fetched"] > 0 and pols["torchrec"]["rows_fetched"] == 0
        assert set(pols["bagpipe"]["trainer_phase_s"]) >= {"plan", "install", "evict", "forward", "backward"}
    # local and the peer never touch the store: run at the first value only, the same line after.
    first, second = (p["policies"] for p in report["points"])
    assert second["local"]["measured_at"] == 0.0 and second["local"]["samples_per_s"] == first["local"]["samples_per_s"]
    assert "measured_at" not in second["bagpipe"]
    assert (out / "store_latency_us=0.0" / "local-0").exists() and not (out / "store_latency_us=3000.0" / "local-0").exists()
    md = (out / "report.md").read_text()
    assert "holds 0.9x local at" in md and "| torchrec |" in md and "placement auto" in md
    assert "`local`, `torchrec` never touch the store: measured at store_latency_us = 0.0 only" in md
    holds = md.split("| holds 0.9x local at |", 1)[1].split("##", 1)[0]
    assert "| bagpipe |" in holds and "| local |" not in holds and "| torchrec |" not in holds
    assert (out / "report.png").stat().st_size > 1000


def test_link_mode_puts_the_shards_behind_a_real_rate_limited_link(small_criteo, tmp_path):
    from bench.netlink import available

    if available():
        pytest.skip(available())
    out = tmp_path / "bench"
    rc = bench_main(["--config", "configs/bench-quick.toml", "--set", f"data={small_criteo}",
                     "--set", "batch_size=256", "--set", "iterations=10", "--set", "cache_rows=3000",
                     "--set", "trainers=1", "--set", "eval_batches=1", "--set", "store_latency_us=0",
                     "--set", "store_bandwidth_gbps=0.5",
                     "--policies", "local,bagpipe", "--repeats", "1", "--run-dir", str(out), "--link"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    link = report["_settings"]["link"]
    assert link["kind"] == "veth + tbf" and link["rate_gbps"] == 0.5
    assert all(url.startswith("redis://10.214.") for url in link["shards"])
    assert report["bagpipe"]["rows_fetched"] > 0
    assert "a real veth link" in (out / "report.md").read_text()


def test_phase_timers_leave_the_warmup_out():
    """The first plan waits for the oracle to start; the reported phase means are the steady
    ones (the span of samples_per_s_steady), the slowest rank's."""
    from bagpipe.runner.job import steady_phase_means

    ranks = [{"phase_s_each_iteration": {"plan": [5.0] + [0.125] * 9, "install": [0.5] * 10}},
             {"phase_s_each_iteration": {"plan": [0.0] + [0.25] * 9, "install": [0.25] * 10}}]
    means = steady_phase_means(ranks, 1)
    assert means["plan"] == 0.25 and means["install"] == 0.5
