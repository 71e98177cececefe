"""The GPU check's helper: the bundle's manifest and self-test, the check's stages, its summary.

``scripts/gpu-bundle.sh`` calls ``manifest``; ``scripts/gpu-check.sh`` calls
``run`` (see docs/gpu.md). Only the standard library is imported here: it
runs before the bundle is installed, under any Python.

    python scripts/gpu_check.py manifest BUNDLE --limit-mib 60 --debs FILE
    python scripts/gpu_check.py bundle BUNDLE [--python PY]    # what the bundle lacks, if anything
    python scripts/gpu_check.py run --out DIR [--dry-run] ...  # the check (gpu-check.sh --help)
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "scripts" / "gpu-requirements.txt"
IMAGE_PACKAGES = REPO / "scripts" / "gpu-image-packages.txt"
BENCH_CONFIG = REPO / "configs" / "bench-gpu.toml"
PROJECT_PACKAGES = ("bagpipe", "oracle", "trainers", "data", "bench")
BENCH_POLICIES = "local,lru-prefetch,bagpipe"
# Wheel tags the GPU image's Python takes (CPython 3.12, manylinux x86-64).
PY_TAGS = {"cp312", "py312", "py3", "py2.py3"}
ABI_TAGS = {"cp312", "abi3", "none"}
# Top-level modules whose distribution's name differs from the module's.
MODULE_DISTS = {"zmq": "pyzmq", "yaml": "pyyaml", "PIL": "pillow", "google": "protobuf", "attr": "attrs",
                "dateutil": "python-dateutil", "mpl_toolkits": "matplotlib", "pkg_resources": "setuptools",
                "_pytest": "pytest", "functorch": "torch", "torchgen": "torch", "fbgemm_gpu": "fbgemm-gpu-cpu",
                "sklearn": "scikit-learn", "cv2": "opencv-python-headless", "pylab": "matplotlib"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path: Path = REQUIREMENTS) -> dict[str, str]:
    """gpu-requirements.txt as {normalized name: version}."""
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        if not m:
            raise ValueError(f"{path.name}:{n}: '{line}' is not NAME==VERSION")
        out[normalize(m.group(1))] = m.group(2)
    return out


def image_packages(path: Path = IMAGE_PACKAGES) -> set[str]:
    return {normalize(line.strip()) for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


@dataclass
class Wheel:
    path: Path
    name: str  # normalized
    version: str
    tags: tuple[str, str, str]

    @classmethod
    def parse(cls, path: Path) -> "Wheel":
        parts = path.name[:-len(".whl")].split("-")
        if not path.name.endswith(".whl") or len(parts) not in (5, 6):
            raise ValueError(f"{path.name} is not a wheel's file name")
        return cls(path, normalize(parts[0]), parts[1], (parts[-3], parts[-2], parts[-1]))

    def fits_image(self) -> bool:
        """Installable by CPython 3.12 on manylinux x86-64 (by its tags)."""
        py, abi, plat = self.tags
        plats = plat.split(".")
        return (bool(set(py.split(".")) & PY_TAGS) and bool(set(abi.split(".")) & ABI_TAGS)
                and all(p == "any" or (p.startswith("manylinux") and p.endswith("_x86_64")) for p in plats))

    def glibc(self) -> tuple[int, int]:
        """The oldest glibc its manylinux tags promise to run on ((0, 0): any)."""
        best = None
        for p in self.tags[2].split("."):
            m = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", p)
            v = (int(m.group(1)), int(m.group(2))) if m else {"manylinux1_x86_64": (2, 5),
                                                               "manylinux2010_x86_64": (2, 12),
                                                               "manylinux2014_x86_64": (2, 17)}.get(p)
            if v and (best is None or v < best):
                best = v
        return best or (0, 0)


def wheels(bundle: Path) -> list[Wheel]:
    return sorted((Wheel.parse(p) for p in (bundle / "wheels").glob("*.whl")), key=lambda w: w.name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _elf_glibc(path: Path) -> tuple[int, int]:
    """The newest GLIBC_x.y symbol version an ELF file names (its loader needs at least that)."""
    data = path.read_bytes()
    if not data.startswith(b"\x7fELF"):
        return (0, 0)
    found = [(int(a), int(b)) for a, b in re.findall(rb"GLIBC_(\d+)\.(\d+)", data)]
    return max(found, default=(0, 0))


# ---------------------------------------------------------------- manifest
def write_manifest(bundle: Path, limit_mib: float, debs: list[str], reqs: dict[str, str] | None = None) -> dict:
    """MANIFEST.json: every file with its size and sha256, the wheels, the Debian packages, the
    glibc everything needs; fails (ValueError) when the bundle holds more than ``limit_mib``."""
    files = sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    total = sum(p.stat().st_size for p in files)
    ws = wheels(bundle)
    problems = _wheel_problems(ws, requirements() if reqs is None else reqs)
    if problems:
        raise ValueError("; ".join(problems))
    glibc = max([w.glibc() for w in ws] + [_elf_glibc(p) for p in (bundle / "redis").rglob("*") if p.is_file()])
    manifest = {
        "made": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "for": "CPython 3.12, manylinux x86-64, torch 2.11 (scripts/gpu-requirements.txt)",
        "bytes": total,
        "limit_mib": limit_mib,
        "glibc_required": f"{glibc[0]}.{glibc[1]}",
        "wheels": {w.name: {"version": w.version, "file": w.path.name} for w in ws},
        "debian_packages": sorted(set(debs)),
        "files": {str(p.relative_to(bundle)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    if total > limit_mib * 2**20:
        raise ValueError(f"the bundle holds {total / 2**20:.1f} MiB, over its limit of {limit_mib} MiB")
    (bundle / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"gpu-bundle: {len(ws)} wheels, {len(manifest['debian_packages'])} Debian packages, "
          f"{total / 2**20:.1f} MiB (limit {limit_mib}), glibc >= {manifest['glibc_required']}", file=sys.stderr)
    return manifest


def _wheel_problems(ws: list[Wheel], reqs: dict[str, str]) -> list[str]:
    problems = []
    have: dict[str, list[Wheel]] = {}
    for w in ws:
        have.setdefault(w.name, []).append(w)
        if not w.fits_image():
            problems.append(f"{w.path.name}: its tags do not fit CPython 3.12 on manylinux x86-64")
    for name, version in reqs.items():
        got = have.get(name, [])
        if not got:
            problems.append(f"no wheel of {name}=={version} (scripts/gpu-requirements.txt)")
        elif len(got) > 1 or got[0].version != version:
            problems.append(f"{name}: wheels {[w.path.name for w in got]}, expected one of version {version}")
    for name in set(have) - set(reqs):
        problems.append(f"{have[name][0].path.name} is not in scripts/gpu-requirements.txt")
    return problems


def verify_manifest(bundle: Path) -> list[str]:
    """What differs between the bundle and its MANIFEST.json (empty: nothing)."""
    path = bundle / "MANIFEST.json"
    if not path.exists():
        return [f"{path} is missing: run 'make gpu-bundle'"]
    manifest = json.loads(path.read_text())
    problems = []
    for rel, info in manifest["files"].items():
        p = bundle / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif p.stat().st_size != info["bytes"] or _sha256(p) != info["sha256"]:
            problems.append(f"{rel} differs from MANIFEST.json (size or sha256)")
    for p in bundle.rglob("*"):
        if p.is_file() and p.name != "MANIFEST.json" and str(p.relative_to(bundle)) not in manifest["files"]:
            problems.append(f"{p.relative_to(bundle)} is not in MANIFEST.json")
    return problems


# ------------------------------------------------------------- imports
def _stdlib() -> set[str]:
    return set(sys.stdlib_module_names) | {"__future__"}


def project_imports(repo: Path = REPO) -> set[str]:
    """Modules (dotted names) outside the standard library and the project that the project's own
    code imports anywhere (functions included: lazy imports run too)."""
    names = set()
    for pkg in PROJECT_PACKAGES:
        for path in (repo / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module)
                    names |= {f"{node.module}.{a.name}" for a in node.names if a.name != "*"}
    skip = _stdlib() | set(PROJECT_PACKAGES)
    return {n for n in names if n.split(".")[0] not in skip}


_PROBE = r"""
import importlib, importlib.metadata as md, json, pkgutil, sys
roots = sys.argv[1].split(",")
failed = {}
for root in roots:
    pkg = importlib.import_module(root)
    for info in pkgutil.walk_packages(pkg.__path__, root + "."):
        if info.name.endswith("__main__"):
            continue  # runs the command line
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failed[info.name] = f"{type(exc).__name__}: {exc}"
dists = md.packages_distributions()
tops = sorted({m.split(".")[0] for m in list(sys.modules)} - set(sys.stdlib_module_names) - set(roots))
# Modules without a file are made at run time (cython_runtime, say), not installed.
tops = [t for t in tops if not t.startswith("_") and getattr(sys.modules.get(t), "__file__", None)]
print(json.dumps({"modules": {t: dists.get(t, []) for t in tops}, "failed": failed}))
"""


def loaded_distributions(python: str, repo: Path = REPO) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Import every module of the project under ``python`` (the project's environment): the
    top-level modules then loaded with their distributions, and the modules that failed to import."""
    out = subprocess.run([python, "-c", _PROBE, ",".join(PROJECT_PACKAGES)], cwd=repo, capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"importing the project under {python} failed: {out.stderr.strip()[-2000:]}")
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    return probe["modules"], probe["failed"]


def _wheel_modules(ws: list[Wheel]) -> dict[str, tuple[Wheel, str]]:
    """{module name: (wheel, source)} for every .py file in the wheels."""
    mods = {}
    for w in ws:
        with zipfile.ZipFile(w.path) as z:
            for name in z.namelist():
                if name.endswith(".py") and ".dist-info/" not in name and ".data/" not in name:
                    mod = name[:-3].replace("/", ".")
                    mod = mod[:-len(".__init__")] if mod.endswith(".__init__") else mod
                    mods[mod] = (w, z.read(name).decode("utf-8", "replace"))
    return mods


class _VersionInfo(tuple):
    major, minor, micro = property(lambda s: s[0]), property(lambda s: s[1]), property(lambda s: s[2])


class _ImageSys:
    version_info = _VersionInfo((3, 12, 3, "final", 0))
    platform = "linux"


def _on_image(test: ast.expr) -> bool | None:
    """An ``if`` on ``sys.version_info`` or ``sys.platform`` as the image's Python would take it
    (None: any other test, whose branches both count)."""
    names = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)}
    if names != {"sys"}:
        return None
    try:
        return bool(eval(compile(ast.Expression(test), "<if>", "eval"), {"__builtins__": {}}, {"sys": _ImageSys}))
    except Exception:
        return None


def _module_level_imports(tree: ast.Module, module: str, is_pkg: bool) -> list[str]:
    """Modules a module imports when it is imported: module level, inside ``if`` (but not
    ``if TYPE_CHECKING``), not inside ``try`` (optional) or functions."""
    out: list[str] = []

    def base(level: int) -> str:
        parts = module.split(".")
        keep = len(parts) - level + (1 if is_pkg else 0)
        return ".".join(parts[:keep])

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    mod = base(node.level) + ("." + mod if mod else "")
                out.append(mod)
                out.extend(f"{mod}.{a.name}" for a in node.names if a.name != "*")
            elif isinstance(node, ast.If):
                taken = _on_image(node.test)
                if "TYPE_CHECKING" in ast.dump(node.test):
                    continue
                if taken is not False:
                    visit(node.body)
                if taken is not True:
                    visit(node.orelse)
            elif isinstance(node, (ast.With,)):
                visit(node.body)
    visit(tree.body)
    return out


def wheel_import_closure(ws: list[Wheel], roots: set[str]) -> dict[str, str]:
    """The top-level modules outside the bundle that importing ``roots`` from the bundled wheels
    reaches: {module: the bundled module that imports it first}."""
    mods = _wheel_modules(ws)
    pkgs = {m for m in mods if any(k.startswith(m + ".") for k in mods)}
    outside: dict[str, str] = {}
    seen: set[str] = set()
    queue = [r for r in roots if r in mods]
    while queue:
        mod = queue.pop()
        if mod in seen:
            continue
        seen.add(mod)
        # Importing a.b.c runs a and a.b first.
        parts = mod.split(".")
        queue += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in mods]
        try:
            tree = ast.parse(mods[mod][1])
        except SyntaxError:
            continue
        for name in _module_level_imports(tree, mod, mod in pkgs):
            if name in mods:
                queue.append(name)
            elif name.split(".")[0] in {m.split(".")[0] for m in mods}:
                continue  # a name inside a bundled module (from pkg import function)
            else:
                outside.setdefault(name.split(".")[0], mod)
    return outside


def bundle_problems(bundle: Path, python: str | None) -> tuple[list[str], dict]:
    """Everything the bundle lacks for a job on the GPU image, and what was checked.

    1. MANIFEST.json matches the files; one wheel per line of gpu-requirements.txt, tags for 3.12.
    2. Every distribution the project's environment loads when it imports all of the project
       (``python``; transitive imports included), and every module the project imports lazily,
       is in the bundle or on the image.
    3. Every module outside the bundle that the bundled wheels import when loaded (read from the
       wheels themselves: their versions are not the project environment's) is in the standard
       library or on the image.
    """
    problems = verify_manifest(bundle)
    ws = wheels(bundle) if (bundle / "wheels").is_dir() else []
    problems += _wheel_problems(ws, requirements())
    image = image_packages()
    bundled = {w.name for w in ws}
    provided = image | bundled

    def dist_of(module: str) -> str:
        return normalize(MODULE_DISTS.get(module, module))

    checked: dict = {"wheels": sorted(bundled)}
    imported = project_imports()
    lazy = {m.split(".")[0] for m in imported}
    for module in sorted(lazy):
        if dist_of(module) not in provided:
            problems.append(f"the project imports {module} ({dist_of(module)}): neither bundled nor on the image")
    checked["project_imports"] = sorted(lazy)
    if python:
        loaded, failed = loaded_distributions(python)
        for module, dists in sorted(loaded.items()):
            names = {normalize(d) for d in dists} or {dist_of(module)}
            names = {"fbgemm-gpu-cpu" if n == "fbgemm-gpu" else n for n in names}
            if not names & provided:
                problems.append(f"importing the project loads {module} ({', '.join(sorted(names))}): "
                                "neither bundled nor on the image")
        for module, error in failed.items():
            problems.append(f"{module} does not import in the project's environment: {error}")
        checked["loaded"] = sorted(loaded)
    # Walk from the very modules the project imports (torchrec.models.dlrm, not only torchrec).
    roots = {m for m in imported if dist_of(m.split(".")[0]) in bundled}
    if python:
        roots |= {m for m, d in loaded.items() if {normalize(x) for x in d} & bundled}
    outside = wheel_import_closure(ws, roots)
    std = _stdlib()
    for module, by in sorted(outside.items()):
        if module not in std and dist_of(module) not in provided:
            problems.append(f"bundled {by} imports {module}: neither bundled nor on the image")
    checked["bundled_imports_outside"] = sorted(m for m in outside if m not in std)
    return problems, checked


# ----------------------------------------------------------------- the check
@dataclass
class Check:
    """The check's stages in order, under one deadline; every stage's result in ``summary``."""

    out: Path
    work: Path
    bundle: Path
    python: str
    dry_run: bool
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    summary: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out, self.work, self.bundle = self.out.resolve(), self.work.resolve(), self.bundle.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "gpu-check.log"
        self.summary = {"date": time.strftime("%Y-%m-%d"), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                        "dry_run": self.dry_run, "budget_s": self.budget_s, "stages": {}}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")

    # ------------------------------------------------------------ plumbing
    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] {text}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def save(self) -> None:
        self.summary["elapsed_s"] = round(time.monotonic() - self.started, 1)
        tmp = self.out / "gpu-check.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1) + "\n")
        os.replace(tmp, self.out / "gpu-check.json")

    def sh(self, cmd: list[str], timeout_s: float, env: dict | None = None, cwd: Path = REPO,
           label: str | None = None) -> tuple[int, str]:
        """Run a command, its output into the log; stopped (its whole process group, by pid) at the
        timeout. Returns (exit code, or 124 for a timeout; the output's last 4000 characters)."""
        self.log("$ " + (label or " ".join(cmd)))
        with open(self.log_path, "ab") as logf:
            start = logf.tell()
            proc = subprocess.Popen(cmd, cwd=cwd, env=env or self.env, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, timeout_s))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc = 124
                self.log(f"timed out after {timeout_s:.0f}s")
        with open(self.log_path, "rb") as f:
            f.seek(start)
            tail = f.read().decode("utf-8", "replace")[-4000:]
        return rc, tail

    def stage(self, name: str, want_s: float, need_s: float, fn) -> bool:
        """Run stage ``fn(timeout_s) -> (ok, detail)`` with at most ``want_s`` (less if the deadline
        is nearer); skipped if under ``need_s`` is left. Recorded in the summary either way."""
        left = self.left() - 5
        if left < need_s:
            self.summary["stages"][name] = {"ok": None, "skipped": f"{left:.0f}s left of the budget, needs {need_s}s"}
            self.log(f"== {name}: skipped ({left:.0f}s left)")
            self.save()
            return False
        self.log(f"== {name}")
        t0 = time.monotonic()
        try:
            ok, detail = fn(min(want_s, left))
        except Exception as exc:  # a stage's own failure is its result, not the check's end
            ok, detail = False, {"error": f"{type(exc).__name__}: {exc}"}
        self.summary["stages"][name] = dict(ok=ok, seconds=round(time.monotonic() - t0, 1), **detail)
        self.log(f"== {name}: {'ok' if ok else 'FAILED'} ({time.monotonic() - t0:.1f}s)")
        self.save()
        return ok

    # -------------------------------------------------------------- stages
    def check_bundle(self, timeout_s: float) -> tuple[bool, dict]:
        if self.dry_run:
            problems, checked = bundle_problems(self.bundle, self.python)
        else:  # the imports are proven by importing them, next
            problems, checked = verify_manifest(self.bundle), {}
        manifest = json.loads((self.bundle / "MANIFEST.json").read_text()) if (self.bundle / "MANIFEST.json").exists() else {}
        for p in problems:
            self.log("bundle: " + p)
        return not problems, {"problems": problems, "checked": checked, "bytes": manifest.get("bytes"),
                              "wheels": {k: v["version"] for k, v in manifest.get("wheels", {}).items()},
                              "glibc_required": manifest.get("glibc_required")}

    def install(self, timeout_s: float) -> tuple[bool, dict]:
        """The wheels into a target folder with pip, no index; redis beside them."""
        target = self.work / "site"
        shutil.rmtree(target, ignore_errors=True)
        cmd = [self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--target", str(target)]
        if self.dry_run:
            # This Python is the project's, not 3.12: unpack for the image's tags, use nothing of it.
            cmd += ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
                    "--abi", "abi3", "--abi", "none"]
            for w in wheels(self.bundle):
                cmd += sum((["--platform", p] for p in w.tags[2].split(".") if p != "any"), [])
        cmd += [str(w.path) for w in wheels(self.bundle)]
        rc, tail = self.sh(cmd, timeout_s)
        redis_dir = self.work / "redis"
        shutil.rmtree(redis_dir, ignore_errors=True)
        shutil.copytree(self.bundle / "redis", redis_dir, symlinks=False)
        for sub in ("bin", "libexec"):
            for p in (redis_dir / sub).iterdir():
                p.chmod(0o755)
        if not self.dry_run:
            self.env["PYTHONPATH"] = os.pathsep.join([str(target), str(REPO)] +
                                                     ([self.env["PYTHONPATH"]] if self.env.get("PYTHONPATH") else []))
        self.env["BAGPIPE_REDIS_SERVER"] = str(redis_dir / "bin" / "redis-server")
        self.env["BAGPIPE_REDIS_CLI"] = str(redis_dir / "bin" / "redis-cli")
        installed = sorted(p.name for p in target.glob("*.dist-info")) if target.exists() else []
        rc2, version = self.sh([self.env["BAGPIPE_REDIS_SERVER"], "--version"], 30)
        return rc == 0 and rc2 == 0, {"target": "work/site", "installed": installed,
                                      "redis_server": version.strip().splitlines()[-1] if version.strip() else "",
                                      "pip_tail": tail[-800:] if rc else ""}

    def environment(self, timeout_s: float) -> tuple[bool, dict]:
        """Versions, the device, and every module of the project imported in the environment the check uses."""
        probe = r"""
import importlib, importlib.metadata as md, json, os, pkgutil, platform, sys
info = {"python": sys.version.split()[0], "glibc": " ".join(platform.libc_ver())}
import torch
info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, device_count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                memory_gib=round(p.total_memory / 2**30, 1))
    try:
        v = torch.cuda.nccl.version()
        info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception as exc:
        info["nccl"] = f"unknown ({exc})"
    x = torch.arange(1024, device="cuda", dtype=torch.float32)
    info["cuda_smoke"] = float((x * 2).sum()) == 1047552.0
versions = {}
for d in ("torchrec", "fbgemm_gpu_cpu", "fbgemm_gpu", "tensordict", "pyzmq", "redis", "hiredis", "numpy", "numba",
          "pyarrow", "pytest", "hypothesis"):
    try:
        versions[d] = md.version(d)
    except md.PackageNotFoundError:
        pass
info["versions"] = versions
failed = {}
for root in ("bagpipe", "oracle", "trainers", "data", "bench"):
    pkg = importlib.import_module(root)
    for m in pkgutil.walk_packages(pkg.__path__, root + "."):
        if m.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(m.name)
        except Exception as exc:
            failed[m.name] = f"{type(exc).__name__}: {exc}"
info["import_failures"] = failed
print("GPU-CHECK-ENV " + json.dumps(info))
"""
        rc, tail = self.sh([self.python, "-c", probe], timeout_s, label=f"{self.python} -c <the environment probe>")
        line = [ln for ln in tail.splitlines() if ln.startswith("GPU-CHECK-ENV ")]
        info = json.loads(line[-1][len("GPU-CHECK-ENV "):]) if line else {"tail": tail[-1500:]}
        smi_rc, smi = self.sh(["nvidia-smi", "-L"], 30) if shutil.which("nvidia-smi") else (1, "")
        if smi_rc == 0:
            info["nvidia_smi"] = smi.strip().splitlines()[-1]
        ok = rc == 0 and not info.get("import_failures")
        if not self.dry_run:
            ok = ok and bool(info.get("cuda_available")) and bool(info.get("cuda_smoke"))
        return ok, info

    def tests(self, timeout_s: float) -> tuple[bool, dict]:
        """The suite's ``gpu`` marker (every test of it is skipped, saying why, without CUDA)."""
        junit = self.out / "junit-gpu.xml"
        rc, tail = self.sh([self.python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                            f"--junitxml={junit}", "tests"], timeout_s)
        results = _junit(junit) if junit.exists() else {}
        counts = {k: sum(1 for r in results.values() if r["outcome"] == k) for k in ("passed", "failed", "skipped")}
        ok = rc == 0 and counts["failed"] == 0 and bool(results)
        no_cuda = [t for t, r in results.items() if r["outcome"] == "skipped" and "CUDA is not available" in r["message"]]
        if not self.dry_run:
            ok = ok and counts["passed"] > 0 and not no_cuda  # on a GPU, nothing skips for want of CUDA
        return ok, {"exit_code": rc, "counts": counts, "tests": results}

    def data(self, timeout_s: float) -> tuple[bool, dict]:
        rows, buckets = (20000, 2000) if self.dry_run else (500000, 40000)
        root = self.work / "data"
        shutil.rmtree(root, ignore_errors=True)
        py = [self.python, "-m", "bagpipe", "data"]
        t0 = time.monotonic()
        rc, _ = self.sh(py + ["synth", "--format", "criteo", "--rows", str(rows), "--out", str(root / "raw"),
                              "--seed", "0", "--files", "4"], timeout_s)
        if rc == 0:
            rc, _ = self.sh(py + ["prepare", "--format", "criteo", "--input", *sorted(map(str, (root / "raw").iterdir())),
                                  "--out", str(root / "prepared"), "--hash-buckets", str(buckets),
                                  "--eval-fraction", "0.02"], max(1.0, timeout_s - (time.monotonic() - t0)))
        return rc == 0, {"rows": rows, "hash_buckets": buckets}

    def bench(self, name: str, synced: bool, timeout_s: float) -> tuple[bool, dict]:
        """``bagpipe bench`` on configs/bench-gpu.toml: samples/s and the trainer's timers per policy."""
        run_dir = self.work / name
        shutil.rmtree(run_dir, ignore_errors=True)
        sets = [f"data={self.work / 'data' / 'prepared'}"]
        # The dry run: the same stages on the CPU, with a model a 2-core machine trains in seconds.
        sets += (["device=cpu", "iterations=6", "batch_size=256", "eval_batches=1", "cache_rows=6000",
                  "embedding_dim=16", "bottom_mlp=[32, 16]", "top_mlp=[32, 1]"] if self.dry_run else ["device=cuda"])
        env = dict(self.env, BAGPIPE_SYNC_TIMERS="1") if synced else self.env
        cmd = [self.python, "-m", "bagpipe", "bench", "--config", str(BENCH_CONFIG), "--policies", BENCH_POLICIES,
               "--repeats", "1", "--run-dir", str(run_dir)] + sum((["--set", s] for s in sets), [])
        rc, _ = self.sh(cmd, timeout_s, env=env)
        policies = {}
        for p in BENCH_POLICIES.split(","):
            mpath = run_dir / f"{p}-0" / "metrics.json"
            if not mpath.exists():
                policies[p] = {"error": "no metrics.json"}
                continue
            m = json.loads(mpath.read_text())
            policies[p] = {k: m.get(k) for k in ("samples_per_s_steady", "samples_per_s", "warmup_iterations",
                                                 "train_wall_s", "stall_s", "rows_fetched", "rows_written_back",
                                                 "eval_auc", "train_logloss", "trainer_phase_s", "peak_rss_bytes")}
        if rc != 0:
            self._tails(run_dir)
        report = run_dir / "report.md"
        if report.exists():
            shutil.copyfile(report, self.out / f"{name}-report.md")
        ok = rc == 0 and all("error" not in v for v in policies.values())
        return ok, {"config": "configs/bench-gpu.toml", "set": sets, "sync_timers": synced, "policies": policies}

    def _tails(self, run_dir: Path) -> None:
        """The last lines of every process's log under a failed run, into the check's log."""
        for p in sorted(run_dir.rglob("*.log")):
            lines = p.read_text(errors="replace").splitlines()[-25:]
            self.log(f"--- {p.relative_to(self.work)} (last {len(lines)} lines)")
            with open(self.log_path, "a") as f:
                f.write("\n".join(lines) + "\n")

    def run(self) -> int:
        self.log(f"gpu-check {'dry run (CPU, the project environment)' if self.dry_run else 'on the GPU'}: "
                 f"python {self.python}, bundle {self.bundle}, budget {self.budget_s:.0f}s")
        ready = self.stage("bundle", 240, 5, self.check_bundle)
        ready = self.stage("install", 120, 10, self.install) and ready
        ready = self.stage("environment", 120, 10, self.environment) and ready
        if not ready and not self.dry_run:
            self.log("the environment is not usable: no tests, no timing")
            return self.finish(required=("bundle", "install", "environment"))
        self.stage("tests", 270, 60, self.tests)
        if self.stage("data", 120, 20, self.data):
            self.stage("bench", 200, 30 if self.dry_run else 60, lambda t: self.bench("bench", False, t))
            if not self.dry_run:  # the timers wait for the device: where the GPU's own time goes
                self.stage("bench-synced", 150, 60, lambda t: self.bench("bench-synced", True, t))
        return self.finish(required=("bundle", "install", "environment", "tests", "data", "bench"))

    def finish(self, required: tuple[str, ...]) -> int:
        """Ok when every required stage ran and passed, and no other stage that ran failed."""
        stages = self.summary["stages"]
        ok = (all(stages.get(n, {}).get("ok") is True for n in required)
              and all(s.get("ok") is not False for s in stages.values()))
        self.summary["ok"] = ok
        self.save()
        self.log(f"gpu-check: {'ok' if ok else 'FAILED'}; summary in {self.out / 'gpu-check.json'}")
        return 0 if ok else 1


def _junit(path: Path) -> dict:
    """{test id: {"outcome", "seconds", "message"}} from pytest's JUnit XML."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        tid = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "")[:500]
            elif child.tag == "skipped":
                outcome, message = "skipped", (child.get("message") or "")[:300]
        out[tid] = {"outcome": outcome, "seconds": round(float(case.get("time", 0) or 0), 2), "message": message}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manifest", help="write BUNDLE/MANIFEST.json (gpu-bundle.sh)")
    m.add_argument("bundle", type=Path)
    m.add_argument("--limit-mib", type=float, default=60)
    m.add_argument("--debs", type=Path, help="a file of Debian PACKAGE=VERSION lines")
    b = sub.add_parser("bundle", help="what the bundle lacks for a job on the GPU image")
    b.add_argument("bundle", type=Path)
    b.add_argument("--python", help="the project's environment, to import the project in (default: none)")
    r = sub.add_parser("run", help="the check (scripts/gpu-check.sh)")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--bundle", type=Path, required=True)
    r.add_argument("--python", required=True)
    r.add_argument("--dry-run", action="store_true")
    r.add_argument("--budget-s", type=float, default=450)
    args = parser.parse_args(argv)
    if args.cmd == "manifest":
        debs = args.debs.read_text().split() if args.debs and args.debs.exists() else []
        try:
            write_manifest(args.bundle, args.limit_mib, debs)
        except ValueError as exc:
            print(f"gpu-bundle: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "bundle":
        problems, checked = bundle_problems(args.bundle, args.python)
        print(json.dumps(checked, indent=1))
        for p in problems:
            print(f"gpu-bundle: {p}", file=sys.stderr)
        return 1 if problems else 0
    return Check(args.out, args.work, args.bundle, args.python, args.dry_run, args.budget_s).run()


if __name__ == "__main__":
    raise SystemExit(main())
