"""The run directory: the one module that knows its files.

Every process of a job meets the others here (besides the sockets): the
runner writes the config, the job id and the endpoints; each trainer writes
its pid and its results; rank 0 writes the model; the runner merges the
metrics. Writes are atomic (a temporary file renamed into place), so a
reader never sees half a file, and a crash leaves the previous one.

    config.json       the job's RunConfig (node 0 writes it; every process reads it)
    job_id            a fresh id per launch; every wire message names it
    secret            the job's secret (owner-only; bagpipe.auth): shard password, hello tokens, rendezvous seals
    endpoints.json    where the embedding servers and the oracle listen
    pids.json         every process this node started, by name
    placement.json    the cores of each local trainer and of the other processes (bagpipe.placement)
    rank<r>.pid       trainer r's pid;  rank<r>.json  its results;  agent<r>.pid  its store agent's
    model.pt          the trained model (dense state_dict, every touched row)
    metrics.json      the merged results;  oracle_stats.json  the planner's counters
    metrics.jsonl     one line per evaluation;  progress.json  rank 0's latest figures (the progress bar)
    curves.png        loss, NE and AUC against iterations;  tensorboard/  the same as event files
    <name>.log        each child's output (oracle, trainers), fresh per launch; the earlier
                      launches' as <name>.log.1 (the last) .. <name>.log.LOG_GENERATIONS
    lock              held (flock) by the job that uses the directory; names its pid
    redis/            the shards this node started;  checkpoints/  see bagpipe.checkpoint

A write that fails (a full disk) raises an OSError naming the file, and
leaves no temporary file behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

LOG_GENERATIONS = 3  # earlier launches' logs kept per child


class RunDirError(RuntimeError):
    """The run directory cannot be used (another job holds it); the message says which."""


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (torch wraps the one its writes raised in a RuntimeError)."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _failed_write(exc: BaseException, path: Path) -> BaseException:
    """The error to raise for a failed write of ``path``: an OSError that names it when the disk failed."""
    cause = _os_error(exc)
    return OSError(cause.errno, cause.strerror or str(cause), str(path)) if cause is not None else exc


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``path`` whole or not at all (a temporary file beside it, then a rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _failed_write(exc, path) from None


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` into ``path``; on a failed write an OSError naming the file (torch's own names
    neither the file nor the cause), the partial file removed."""
    import torch

    path = Path(path)
    try:
        # Unbuffered, so a write that fails raises inside torch.save as the OSError it is.
        with open(path, "wb", buffering=0) as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as exc:
        path.unlink(missing_ok=True)
        raise _failed_write(exc, path) from None


class RunLock:
    """An exclusive ``flock`` on a run directory's ``lock`` file, held for a job's lifetime.

    The kernel drops it when the holder exits, however it exits, so a killed
    job leaves no stale lock. The file names the holder, for the error a
    second job gets.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            raise RunDirError(f"run directory {path.parent} is in use by another job ({holder}); wait for it "
                              "to end or give another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the only descriptor drops the lock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunDir:
    """The files of one run directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def secret_path(self) -> Path:
        return self.path / "secret"

    @property
    def model_path(self) -> Path:
        return self.path / "model.pt"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def redis(self) -> Path:
        return self.path / "redis"

    def log(self, name: str) -> Path:
        """The output of the child called ``name`` (``oracle``, ``trainers``)."""
        return self.path / f"{name}.log"

    def rank_result_path(self, rank: int) -> Path:
        return self.path / f"rank{rank}.json"

    # ------------------------------------------------------------ contents
    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def lock(self) -> RunLock:
        """Take the directory for one job (``RunDirError`` naming the holder if another job has it)."""
        self.create()
        return RunLock(self.path / "lock")

    def rotate_logs(self) -> None:
        """Start every child's log fresh for a new launch, keeping the earlier ones
        (``<name>.log.1`` the last, up to ``LOG_GENERATIONS``)."""
        for log in sorted(self.path.glob("*.log")):
            for k in range(LOG_GENERATIONS - 1, 0, -1):
                older = log.with_name(f"{log.name}.{k}")
                if older.exists():
                    os.replace(older, log.with_name(f"{log.name}.{k + 1}"))
            os.replace(log, log.with_name(f"{log.name}.1"))

    def has_config(self) -> bool:
        return self.config_path.exists()

    def write_config(self, values: dict[str, Any]) -> None:
        write_atomic(self.config_path, json.dumps(values, indent=1))

    def read_config(self) -> dict[str, Any]:
        return json.loads(self.config_path.read_text())

    def write_job_id(self, job_id: str) -> None:
        write_atomic(self.path / "job_id", job_id)

    def job_id(self) -> str:
        return (self.path / "job_id").read_text().strip()

    def write_endpoints(self, endpoints: dict[str, Any]) -> None:
        write_atomic(self.path / "endpoints.json", json.dumps(endpoints))

    def endpoints(self) -> dict[str, Any]:
        return json.loads((self.path / "endpoints.json").read_text())

    def write_pids(self, pids: dict[str, int]) -> None:
        write_atomic(self.path / "pids.json", json.dumps(pids))

    def pids(self) -> dict[str, int]:
        return json.loads((self.path / "pids.json").read_text())

    def write_rank_pid(self, rank: int, pid: int) -> None:
        write_atomic(self.path / f"rank{rank}.pid", str(pid))

    def write_agent_pid(self, rank: int, pid: int) -> None:
        write_atomic(self.path / f"agent{rank}.pid", str(pid))

    def agent_pid(self, rank: int) -> int:
        return int((self.path / f"agent{rank}.pid").read_text())

    def write_rank_result(self, rank: int, result: dict[str, Any]) -> None:
        write_atomic(self.rank_result_path(rank), json.dumps(result))

    def rank_results(self) -> list[dict[str, Any]]:
        """Every trainer result this node's ranks wrote, in rank order."""
        found = [(int(p.stem[4:]), p) for p in self.path.glob("rank*.json") if p.stem[4:].isdigit()]
        return [json.loads(p.read_text()) for _, p in sorted(found)]

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_atomic(self.metrics_path, json.dumps(metrics, indent=1))

    def metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_path.read_text())

    def write_placement(self, placement: dict[str, Any]) -> None:
        write_atomic(self.path / "placement.json", json.dumps(placement))

    def placement(self) -> dict[str, Any]:
        path = self.path / "placement.json"
        return json.loads(path.read_text()) if path.exists() else {}

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def curves_path(self) -> Path:
        return self.path / "curves.png"

    def write_progress(self, progress: dict[str, Any]) -> None:
        write_atomic(self.path / "progress.json", json.dumps(progress))

    def progress(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / "progress.json").read_text())
        except (OSError, ValueError):
            return None

    def append_eval(self, record: dict[str, Any]) -> None:
        """One evaluation's figures as a line of ``metrics.jsonl`` (the history, in order)."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def eval_history(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []

    def write_oracle_stats(self, stats: Any) -> None:
        write_atomic(self.path / "oracle_stats.json", json.dumps(stats, indent=1))

    def write_model(self, model: dict[str, Any]) -> None:
        tmp = self.path / ".model.pt.tmp"
        save_torch(model, tmp)
        os.replace(tmp, self.model_path)

    def clear_history(self) -> None:
        """A fresh (not resumed) job: no evaluation history or event files from an earlier one."""
        import shutil

        (self.path / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(self.tensorboard, ignore_errors=True)

    def clear_results(self) -> None:
        """Forget an earlier launch's per-rank files, model and metrics (a new launch writes its own)."""
        for old in (list(self.path.glob("rank*.json")) + list(self.path.glob("rank*.pid"))
                    + list(self.path.glob("agent*.pid"))
                    + [self.model_path, self.metrics_path, self.path / "progress.json", self.curves_path]):
            old.unlink(missing_ok=True)
