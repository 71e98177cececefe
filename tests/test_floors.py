"""The house's floors: imports run downward only, and each fact has one owner.

Floors (docs/design.md draws them):
  0. ground: ``bagpipe.*`` except ``bagpipe.runner`` (config, keys, wire, policies, run directory,
     dataset reader, store, servers, metrics, log, process helpers, checkpoints, faults);
  1. components: ``data``, ``oracle``, ``trainers``: peers that never import each other;
  2. roof: ``bagpipe.runner`` (job, check, CLI, export), ``python -m bagpipe`` and ``bench``.
Every import is checked, module-level or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bagpipe.policies import POLICIES, policy

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bagpipe", "data", "oracle", "trainers", "bench")
COMPONENTS = ("data", "oracle", "trainers")


def floor_of(module: str) -> tuple[int, str]:
    """(floor, group) of a project module name; group tells peers apart on floor 1."""
    top = module.split(".")[0]
    roof = module in ("bagpipe.runner", "bagpipe.__main__") or module.startswith("bagpipe.runner.")
    if roof or top == "bench":
        return 2, "roof"
    if top == "bagpipe":
        return 0, "ground"
    return 1, top


def project_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported project module) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
            # "from oracle import planner" imports oracle.planner
            names += [f"{names[0]}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                found.append((node.lineno, name))
    return found


def test_imports_run_downward_and_peers_do_not_meet():
    modules = project_modules()
    assert "bagpipe.wire" in modules and "trainers.trainer" in modules
    wrong = []
    for module, path in sorted(modules.items()):
        floor, group = floor_of(module)
        for line, name in imports_of(path, module):
            target = max((m for m in modules if name == m or name.startswith(m + ".")), key=len, default=None)
            if target is None:
                continue  # a name inside a module ("from bagpipe.wire import Plan" also yields bagpipe.wire.Plan)
            t_floor, t_group = floor_of(target)
            if t_floor > floor or (t_floor == floor == 1 and t_group != group):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module} (floor {floor}, {group}) imports "
                             f"{target} (floor {t_floor}, {t_group})")
    assert not wrong, "imports that break the floors:\n" + "\n".join(wrong)


def test_the_rule_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from bagpipe.runner.job import run_job\n")
    assert (2, "bagpipe.runner.job") in [(line, name) for line, name in imports_of(bad, "bagpipe.bad")]
    assert floor_of("bagpipe.runner.job")[0] > floor_of("bagpipe.bad")[0]


def test_policy_table_matches_the_planner_kernels():
    from oracle import fastplan as fp

    codes = {"none": fp.P_NONE, "lru": fp.P_LRU, "lfu": fp.P_LFU, "lru-prefetch": fp.P_LRU_PREFETCH,
             "static": fp.P_STATIC, "bagpipe": fp.P_BAGPIPE, "bagpipe-original": fp.P_ORIGINAL}
    assert {p.name: p.code for p in POLICIES.values() if p.planned} == codes
    assert not policy("local").planned and policy("local").code == -1
    assert policy("bagpipe").lead(5) == 5 and policy("lru-prefetch").lead(5) == 1 and policy("lru").lead(5) == 0


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(ValueError, match="'lur' is not one of local, none, lru"):
        policy("lur")


def test_no_policy_names_spelled_out_in_code():
    """Every question about a policy is a lookup in bagpipe.policies: no list of names elsewhere."""
    names = [f'"{n}"' for n in POLICIES if n != "bagpipe"]  # "bagpipe" is also the project's name
    offenders = []
    for module, path in project_modules().items():
        if module in ("bagpipe.policies", "bagpipe.runner.check", "bench.policies", "oracle.simulate"):
            continue  # the table itself; the harness, the bench and simulate choose policies to run
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(f"== {name}" in code or f"!= {name}" in code or f"in ({name}" in code for name in names):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "policy names compared outside bagpipe.policies:\n" + "\n".join(offenders)
