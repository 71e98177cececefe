"""What a new user sees: a progress bar in a terminal, NE beside AUC, the history, curves and TensorBoard."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
JOB = ["batch_size=256", "iterations=24", "cache_rows=3000", "lead=2", "horizon=4", "eval_batches=2",
       "eval_every=8", "trainers=1", "shards=1"]


def test_a_terminal_shows_a_progress_bar_and_the_run_directory_holds_every_record(small_criteo, tmp_path):
    run_dir = tmp_path / "run"
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "bagpipe", "run", "--run-dir", str(run_dir), "--set", f"data={small_criteo}", *JOB]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "training:" in text and "samples/s=" in text and "24/24" in text, text[-2000:]
    assert " INFO [trainer 0] iteration " not in text  # the bar replaces the per-iteration lines

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 < metrics["eval_ne"] < 1.5 and metrics["eval_auc"] > 0.5
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in history] == [7, 15, 23]
    assert all({"auc", "logloss", "ne"} <= set(h) for h in history)
    assert (run_dir / "curves.png").stat().st_size > 5000

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/samples_per_s", "train/hit_rate", "eval/auc", "eval/ne", "eval/logloss"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(24))
    assert [round(e.value, 6) for e in events.Scalars("eval/ne")] == [round(h["ne"], 6) for h in history]


def test_output_to_a_file_stays_timestamped_lines_with_an_eta(small_criteo, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "bagpipe", "run", "--run-dir", str(run_dir),
                          "--set", f"data={small_criteo}", *JOB, "tensorboard=false"],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if "[trainer 0] iteration " in ln]
    assert lines and all("ETA" in ln and "samples/s" in ln for ln in lines)
    assert "NE" in out.stdout and "samples/s steady" in out.stdout
    assert not (run_dir / "tensorboard").exists()


def test_data_commands_report_progress_with_an_eta_when_not_on_a_terminal(caplog):
    """Off a terminal (CI, a log file), synth, prepare and multi-hot log rows, rows/s and an ETA."""
    import logging

    from bagpipe.progress import Progress

    log = logging.getLogger("progress-under-test")
    with caplog.at_level(logging.INFO, logger=log.name):
        p = Progress("prepare", 1000, log, every_s=0.0)
        p.add(250)
        p.add(250)
        p.close()
    lines = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert len(lines) == 2 and lines[1].startswith("prepare: 500 / 1000 rows (") and "ETA" in lines[1]
