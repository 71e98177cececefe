"""``bagpipe export RUN_DIR --out FILE``: the trained model of a finished run.

The job's last plan evicts and writes back every cached row, and rank 0
then saves ``model.pt``: the dense ``state_dict`` and, per table, the ids of
every row ever touched with their final values (embedding and optimizer
state). Export checks that file and writes it where the user asks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch


def load_model(run_dir: Path) -> dict:
    path = Path(run_dir) / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the run in {run_dir} did not finish")
    # weights_only: the file holds tensors and plain containers; nothing else is unpickled.
    return torch.load(path, map_location="cpu", weights_only=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagpipe export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        model = load_model(args.run_dir)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"bagpipe export: {exc}", file=sys.stderr)
        return 1
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.copyfile(args.run_dir / "model.pt", tmp)
    os.replace(tmp, args.out)
    rows = sum(len(t["ids"]) for t in model["tables"].values())
    print(f"wrote {args.out}: {len(model['dense'])} dense tensors, {len(model['tables'])} tables, {rows} rows")
    return 0
