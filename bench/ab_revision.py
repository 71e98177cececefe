"""One module of the planner as it was at a revision against as it is now, side by side in one process.

    .venv/bin/python bench/ab_revision.py --path oracle/staging.py --rev 093ce84 [--rounds 9]

Loads ``--path`` as it was at ``--rev`` (``git show``) beside the current
module, and swaps which one the planner uses by rebinding, in every loaded
``oracle``/``bagpipe`` module, the names imported from it (``from
oracle.staging import stage_fetches`` binds a name in ``oracle.shell``, so
that is where the swap happens). Then it plans ``bench/oracle_speed.py``'s
trace (batch 4096, 26 tables, 30 iterations, 2 trainers, cache 60,000)
with the old and the new module in turn, ABBA order, ``--rounds`` times each,
and prints the medians and their ratio. Alternating in one process keeps
the machine's drift (large on these shared hosts) out of the ratio.

It first checks that both plan the trace identically (every field of every
plan, write-backs never acknowledged and acknowledged 0 and 2 iterations
behind): the comparison is for changes that keep the plans, and refuses to
time one that does not.

Only a module whose revision imports what the current tree provides can be
loaded this way; kernels under ``oracle/fastplan`` (numba's cache is keyed
by file) are compared from two checkouts instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import pathlib
import statistics
import subprocess
import sys
import types

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from oracle_speed import plan_rate, warm_up, zipf_trace  # noqa: E402

from oracle import planner  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_revision(path: str, rev: str) -> tuple[types.ModuleType, types.ModuleType]:
    """(the module now, the module at ``rev``), the latter loaded from ``git show rev:path``."""
    if not path.endswith(".py") or not (ROOT / path).is_file():
        raise SystemExit(f"ab_revision: --path {path}: no such module file in the repository (give e.g. oracle/staging.py)")
    name = path.removesuffix(".py").replace("/", ".")
    current = importlib.import_module(name)
    try:
        source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                                text=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"ab_revision: git show {rev}:{path} failed: {e.stderr.strip()}") from None
    old = types.ModuleType(f"{name}@{rev}")
    old.__file__ = f"{path}@{rev}"
    exec(compile(source, old.__file__, "exec"), old.__dict__)
    return current, old


def use(module: types.ModuleType, current: types.ModuleType, old: types.ModuleType) -> None:
    """Rebind every name that a loaded project module imported from ``current`` to ``module``'s."""
    for side in (current, old):
        for loaded in list(sys.modules.values()):
            if loaded is None or not getattr(loaded, "__name__", "").startswith(("oracle", "bagpipe")):
                continue
            for attr, value in list(vars(loaded).items()):
                if callable(value) and getattr(side, attr, None) is value and loaded is not side:
                    setattr(loaded, attr, getattr(module, attr))


def plans_of(trace, ack_lag: int) -> list:
    cfg = planner.PlannerConfig("bagpipe", 60_000, 2, 8, 2, 4096, len(trace))
    p = planner.Planner(cfg, trace)
    out = []
    for i, plans in p.plans():
        if ack_lag >= 0:
            p.note_writebacks_applied(i - ack_lag)
        out.append(plans)
    return out


def first_difference(a: list, b: list) -> str | None:
    if len(a) != len(b):
        return f"{len(a)} iterations against {len(b)}"
    for plans_a, plans_b in zip(a, b):
        for x, y in zip(plans_a, plans_b):
            for f in dataclasses.fields(x):
                u, v = getattr(x, f.name), getattr(y, f.name)
                same = (u.dtype == v.dtype and np.array_equal(u, v)) if isinstance(u, np.ndarray) else u == v
                if not same:
                    return f"iteration {x.iteration}, trainer {x.rank}: {f.name}"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", required=True, help="the module's file, relative to the repository root")
    parser.add_argument("--rev", required=True, help="the git revision to compare against")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    current, old = load_revision(args.path, args.rev)
    warm_up(26)
    trace = zipf_trace(30, 4096, 26, 1_000_000)
    for lag in (-1, 0, 2):
        use(old, current, old)
        before = plans_of(trace, lag)
        use(current, current, old)
        diff = first_difference(before, plans_of(trace, lag))
        if diff:
            raise SystemExit(f"ab_revision: {args.path} at {args.rev} plans differently (ack lag {lag}, {diff}); "
                             "this bench compares only changes that keep the plans")
    print(f"plans identical, field by field, at ack lag -1, 0 and 2 ({len(trace)} iterations, 2 trainers)")
    rates: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(args.rounds):
        order = (("old", old), ("new", current)) if r % 2 == 0 else (("new", current), ("old", old))
        for label, module in order:
            use(module, current, old)
            rates[label].append(plan_rate(trace, 4096, 2, 60_000)[0])
    use(current, current, old)
    for label, runs in rates.items():
        rev = args.rev if label == "old" else "working tree"
        print(f"{args.path} at {rev}: median {statistics.median(runs) / 1e6:.2f}M ids/s "
              f"({', '.join(f'{x / 1e6:.2f}' for x in runs)})")
    print(f"new / old: {statistics.median(rates['new']) / statistics.median(rates['old']):.3f}")


if __name__ == "__main__":
    main()
