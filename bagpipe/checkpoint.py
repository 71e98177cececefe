"""Checkpoints: complete or absent, checked on load, refused when they belong to another job.

A checkpoint after iteration ``k`` is a directory ``checkpoints/iter-<k>``:

* ``dense.pt``: the dense model's and dense optimizer's state, torch's RNG
  state and the iteration (saved by rank 0; dense parameters are data
  parallel, so every rank holds the same values);
* ``rows-<n>.parquet``: every embedding row that differs from its initial
  value, as ``key`` (int64) and ``value`` (float32 list: embedding followed
  by optimizer state), taken from the store after every cache was flushed
  and every write-back had landed (one barrier for embeddings, their
  optimizer state and the dense state);
* ``manifest.json``: the iteration, the job's fingerprint (every config key
  that changes the trained model, and the dataset's content hash), the
  format version and a SHA-256 of every file.

It is written into ``checkpoints/.tmp-<k>`` and renamed into place only when
complete, then ``checkpoints/LATEST`` is replaced atomically. A write that
fails (a full disk) removes the temporary directory and raises
``CheckpointError`` naming the file; the previous checkpoint stays. Why Parquet
rows rather than Redis ``BGSAVE``: it works the same for servers the job
started, servers it was pointed at and a Redis Cluster, it is checksummed,
and a resume can load it into any number of shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from bagpipe.rundir import save_torch, write_atomic

FORMAT_VERSION = 1
# Config keys whose change makes a different model (a resume must match them all). Not among
# them: 'iterations' (a run may be extended), and everything that only changes speed
# (policy, trainers, cache, lead, horizon, shards): the model does not depend on those.
FINGERPRINT_KEYS = ("model", "embedding_dim", "bottom_mlp", "top_mlp", "dcn_layers", "dcn_rank", "pooling", "optimizer",
                    "lr",
                    "dense_lr", "eps", "seed", "batch_size", "shuffle")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, or from another job or version."""


def fingerprint(cfg_dict: dict, data_hash: str) -> dict:
    fp = {k: cfg_dict[k] for k in FINGERPRINT_KEYS}
    fp = json.loads(json.dumps(fp))  # tuples -> lists, as they come back from JSON
    fp["data_content_hash"] = data_hash
    return fp


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Checkpoints:
    """The checkpoints of one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.root = Path(run_dir) / "checkpoints"

    def latest_name(self) -> str | None:
        """What ``LATEST`` names (None: no checkpoint yet), unchecked."""
        try:
            return (self.root / "LATEST").read_text().strip() or None
        except OSError:
            return None

    def latest(self) -> Path | None:
        pointer = self.root / "LATEST"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "manifest.json").exists():
            raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint")
        return path

    def write(self, iteration: int, fp: dict, dense_state: dict,
              row_chunks: Iterable[tuple[np.ndarray, np.ndarray]], keep: int = 2) -> Path:
        """Write the checkpoint after ``iteration`` atomically; keeps the newest ``keep``.

        Only the job holding the run directory's lock writes here, so any
        temporary directory found is an unfinished write of an earlier launch.
        """
        name = f"iter-{iteration:09d}"
        tmp = self.root / f".tmp-{name}"
        at = tmp
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
            at = tmp / "dense.pt"
            save_torch(dense_state, at)
            rows = 0
            for n, (keys, values) in enumerate(c for c in row_chunks if len(c[0])):
                at = tmp / f"rows-{n:05d}.parquet"
                _write_rows(at, keys, values)
                rows += len(keys)
            at = tmp / "manifest.json"
            files = sorted(p.name for p in tmp.iterdir())
            manifest = {"format_version": FORMAT_VERSION, "iteration": iteration, "fingerprint": fp, "rows": rows,
                        "files": {f: _sha256(tmp / f) for f in files}}
            write_atomic(at, json.dumps(manifest, indent=1))
            final = self.root / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            at = self.root / "LATEST"
            write_atomic(at, name)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(exc, OSError):
                raise
            before = self.latest_name()
            raise CheckpointError(f"checkpoint after iteration {iteration}: cannot write {at}: "
                                  f"{exc.strerror or exc} (the partial checkpoint was removed; "
                                  + (f"the previous one, {before}, is intact)" if before else "no earlier one)")) from None
        for old in sorted(p for p in self.root.glob("iter-*") if p.name != name)[:-(keep - 1) or None]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def _write_rows(path: Path, keys: np.ndarray, values: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"key": pa.array(keys, pa.int64()),
                      "value": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()),
                                                                 values.shape[1])})
    pq.write_table(table, path)


def load_manifest(path: Path, expect: dict) -> dict:
    """Read and verify a checkpoint: checksums, format version, and the job's fingerprint."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}/manifest.json is unreadable: {exc}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format_version')!r}, "
                              f"this version reads {FORMAT_VERSION}")
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.exists() or _sha256(f) != digest:
            raise CheckpointError(f"{path}: {name} is missing or damaged (checksum mismatch)")
    got = manifest.get("fingerprint", {})
    for key, value in expect.items():
        if got.get(key) != value:
            raise CheckpointError(f"{path} is from another job: config key '{key}' was {got.get(key)!r}, "
                                  f"this job has {value!r}")
    return manifest


def read_rows(path: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The checkpoint's rows, chunk by chunk: (keys int64 [n], values float32 [n, width])."""
    import pyarrow.parquet as pq

    for f in sorted(path.glob("rows-*.parquet")):
        table = pq.read_table(f)
        keys = table.column("key").to_numpy()
        col = table.column("value").combine_chunks()
        width = col.type.list_size
        values = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        yield keys, np.ascontiguousarray(values, dtype=np.float32)
