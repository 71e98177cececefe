"""Helpers for tests that start jobs as a user would and check their processes are gone
(imported by the job and fault tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """Wait until every pid is gone; returns those still alive at the deadline."""
    deadline = time.monotonic() + timeout_s
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if alive(p)]
    return left


def set_args(settings: dict) -> list[str]:
    """``--set K=V`` for each setting (strings as JSON, as the command line takes them)."""
    out = []
    for k, v in settings.items():
        out += ["--set", f"{k}={json.dumps(v) if isinstance(v, str) else v}"]
    return out


def start_job(run_dir: Path, data: Path, settings: dict, resume: bool = False) -> subprocess.Popen:
    """``bagpipe run`` in its own session (so a test can kill its whole group), output captured."""
    cmd = [sys.executable, "-m", "bagpipe", "run", "--run-dir", str(run_dir)]
    cmd += ["--resume"] if resume else ["--set", f"data={data}"] + set_args(settings)
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_checkpoint(job: subprocess.Popen, run_dir: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not (run_dir / "checkpoints" / "LATEST").exists():
        assert job.poll() is None, job.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.1)


def finish(job: subprocess.Popen, timeout_s: float = 180) -> tuple[int, str]:
    """The job's exit code and output; killed (its whole group) if it outlives ``timeout_s``."""
    try:
        out, _ = job.communicate(timeout=timeout_s)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    return job.returncode, out
