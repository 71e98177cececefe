"""The GPU bundle and check, on the CPU: what ``make gpu-bundle`` must hold and ``gpu-check.sh --dry-run``.

The GPU machine has no network: every import a job makes must come from its
image or from the bundle. These tests check the helper that decides that
(scripts/gpu_check.py) on small made-up wheels, that the trainer path needs
none of fbgemm's operators (so fbgemm's CPU build suffices beside CUDA
torch), and, where the bundle was built here, the whole dry run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402

BUNDLE = REPO / ".gpu-bundle"


def _wheel(dirpath: Path, filename: str, files: dict[str, str]) -> Path:
    path = dirpath / filename
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


# ------------------------------------------------------------------ wheels
@pytest.mark.parametrize("filename, fits", [
    ("torchrec-1.6.1-py312-none-any.whl", True),
    ("pyzmq-27.1.0-cp312-abi3-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl", True),
    ("hiredis-3.5.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
    ("hiredis-3.5.0-cp311-cp311-manylinux2014_x86_64.whl", False),
    ("hiredis-3.5.0-cp312-cp312-macosx_11_0_arm64.whl", False),
    ("hiredis-3.5.0-cp312-cp312-manylinux_2_17_aarch64.whl", False),
])
def test_wheel_tags_that_fit_the_gpu_image(filename, fits):
    assert gpu_check.Wheel.parse(Path(filename)).fits_image() is fits


def test_the_requirements_list_is_pinned_and_names_what_the_trainer_path_imports():
    reqs = gpu_check.requirements()
    assert {"torchrec", "fbgemm-gpu-cpu", "pyzmq", "redis", "hiredis"} <= set(reqs)
    # torchrec and fbgemm from the same release line (fbgemm_gpu ties each minor release to one torch).
    assert reqs["torchrec"].split(".")[:2] == reqs["fbgemm-gpu-cpu"].split(".")[:2]
    image = gpu_check.image_packages()
    assert {"torch", "numpy", "numba", "pyarrow", "pytest"} <= image
    assert not set(reqs) & image, "bundled and on the image: carry one version only"


def test_a_bad_requirements_line_is_named(tmp_path):
    bad = tmp_path / "req.txt"
    bad.write_text("# ok\ntorchrec==1.6.1\nredis>=6\n")
    with pytest.raises(ValueError, match=r"req.txt:3: 'redis>=6' is not NAME==VERSION"):
        gpu_check.requirements(bad)


def test_import_closure_follows_what_runs_at_import_time(tmp_path):
    """Module level and ``if`` bodies count; ``try`` (optional), functions (lazy), TYPE_CHECKING and
    version branches the image's Python 3.12 does not take do not."""
    w = _wheel(tmp_path, "pkg-1.0-py3-none-any.whl", {
        "pkg/__init__.py": "import os\nfrom . import sub\n",
        "pkg/sub.py": (
            "import sys\nfrom typing import TYPE_CHECKING\nimport needed_dep\n"
            "from pkg.deep import helper\n"
            "try:\n    import optional_dep\nexcept ImportError:\n    optional_dep = None\n"
            "if TYPE_CHECKING:\n    import typing_only_dep\n"
            "if sys.version_info.major >= 3 and sys.version_info.minor >= 11:\n    import tomllib\n"
            "else:\n    import old_python_dep\n"
            "def f():\n    import lazy_dep\n"),
        "pkg/deep.py": "from other_dep.x import y\ndef helper():\n    pass\n",
        "pkg/unreached.py": "import unreached_dep\n",
    })
    outside = gpu_check.wheel_import_closure([gpu_check.Wheel.parse(w)], {"pkg"})
    assert set(outside) == {"os", "sys", "typing", "needed_dep", "tomllib", "other_dep"}
    assert outside["other_dep"] == "pkg.deep"
    # From a submodule, its parents run first.
    assert "os" in gpu_check.wheel_import_closure([gpu_check.Wheel.parse(w)], {"pkg.deep"})


def _fake_bundle(root: Path) -> Path:
    bundle = root / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    (bundle / "redis" / "bin").mkdir(parents=True)
    _wheel(bundle / "wheels", "a-1.0-py3-none-any.whl", {"a/__init__.py": ""})
    (bundle / "redis" / "bin" / "redis-server").write_text("#!/bin/sh\n")
    return bundle


def test_the_manifest_names_a_changed_missing_or_extra_file(tmp_path):
    bundle = _fake_bundle(tmp_path)
    manifest = gpu_check.write_manifest(bundle, 1, ["redis-tools=7"], reqs={"a": "1.0"})
    assert manifest["wheels"] == {"a": {"version": "1.0", "file": "a-1.0-py3-none-any.whl"}}
    assert gpu_check.verify_manifest(bundle) == []
    (bundle / "redis" / "bin" / "redis-server").write_text("#!/bin/sh\nexit 1\n")
    (bundle / "extra").write_text("x")
    (bundle / "wheels" / "a-1.0-py3-none-any.whl").unlink()
    assert sorted(gpu_check.verify_manifest(bundle)) == [
        "extra is not in MANIFEST.json", "redis/bin/redis-server differs from MANIFEST.json (size or sha256)",
        "wheels/a-1.0-py3-none-any.whl is missing"]


def test_the_manifest_refuses_a_bundle_over_its_limit_or_off_its_list(tmp_path):
    bundle = _fake_bundle(tmp_path)
    with pytest.raises(ValueError, match=r"over its limit of 1e-06 MiB"):
        gpu_check.write_manifest(bundle, 1e-6, [], reqs={"a": "1.0"})
    with pytest.raises(ValueError, match=r"no wheel of b==2.0"):
        gpu_check.write_manifest(bundle, 1, [], reqs={"a": "1.0", "b": "2.0"})
    with pytest.raises(ValueError, match=r"a: wheels .* expected one of version 1.1"):
        gpu_check.write_manifest(bundle, 1, [], reqs={"a": "1.1"})
    assert not (bundle / "MANIFEST.json").exists()


def test_the_check_without_a_bundle_says_so_in_one_line(tmp_path):
    out = subprocess.run(["bash", "scripts/gpu-check.sh", "--dry-run", "--python", sys.executable,
                          "--bundle", str(tmp_path / "none"), "--out", str(tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"gpu-check: no bundle at {tmp_path / 'none'} (make gpu-bundle, where the registries can be reached)"]


# ---------------------------------------------------- no fbgemm operator on the path
class _Ops(TorchDispatchMode):
    """Records the namespace of every operator dispatched (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.name())  # "aten::index_select"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model_name", ["dlrm", "dcn"])
def test_the_trainer_path_runs_no_fbgemm_operator(model_name, monkeypatch):
    """KeyedJaggedTensor, KeyedTensor and the arches are used only through plain torch operators, so
    the bundle's CPU build of fbgemm (no CUDA kernels) is all a CUDA trainer needs of it. (On the CPU
    the pooled lookup takes fbgemm's dense operator; off it, ``trainers.cache.pooled_lookup`` takes
    the plain-torch path, which is what this traces.)"""
    import fbgemm_gpu  # noqa: F401  (its operators registered, as in a trainer)
    import trainers.cache

    monkeypatch.setattr(trainers.cache, "_FBGEMM_LOOKUP", None)  # the path a CUDA device takes

    from bagpipe.config import CacheConfig, ModelConfig
    from bagpipe.dataset import Batch
    from trainers.cache import RowInstaller
    from trainers.embeddings import LocalEmbeddings
    from trainers.models import build_dense_model
    from trainers.step import SoloCommunicator, Step

    rng = np.random.default_rng(0)
    sizes = np.array([100, 20, 300], np.int64)
    sparse = [np.stack([rng.integers(0, n, 32) for n in sizes], axis=1) for _ in range(2)]
    dev = torch.device("cpu")
    emb = LocalEmbeddings(sizes, CacheConfig(), 8, 0, dev, sparse, 0, 1)
    model = build_dense_model(ModelConfig(name=model_name, embedding_dim=8, bottom_mlp=(16, 8),
                                          top_mlp=(16, 1)), 13, 3)
    step = Step(model, torch.optim.Adagrad(list(model.parameters()), lr=0.05), SoloCommunicator(),
                ["a", "b", "c"], 32, dev)
    ops = _Ops()
    with ops:
        for i in range(2):
            batch = Batch(dense=rng.standard_normal((32, 13)).astype(np.float32),
                          labels=(rng.random(32) < 0.5).astype(np.float32), sparse=sparse[i], iteration=i)
            step(i, emb.next_plan(i), emb, batch)
        RowInstaller(dev)(emb.cache, np.array([3, 1], np.int32), np.ones((2, emb.cache.width), np.float32))
    assert {"aten::index_select", "aten::addmm"} <= ops.seen  # it sees the step's operators
    assert not [op for op in ops.seen if op.startswith("fbgemm::")], sorted(ops.seen)
    # The recorder does see fbgemm's operators when they run: the test can fail.
    with _Ops() as probe:
        torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2], dtype=torch.int64))
    assert any(op.startswith("fbgemm::") for op in probe.seen)


# ------------------------------------------------------------------- the dry run
@pytest.mark.slow
def test_the_dry_run_passes_on_the_built_bundle(tmp_path):
    """``gpu-check.sh --dry-run``: the bundle holds every import, unpacks for the image's tags, its
    redis-server runs here; the gpu tests are skipped saying why; the timing stages run on the CPU."""
    if not (BUNDLE / "MANIFEST.json").exists():
        pytest.skip("no bundle here: `make gpu-bundle` makes it (the checks above cover the helper)")
    out = subprocess.run(["bash", "scripts/gpu-check.sh", "--dry-run", "--python", sys.executable,
                          "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--budget-s", "560"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    summary = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert out.returncode == 0 and summary["ok"], (out.stdout + out.stderr)[-4000:]
    stages = summary["stages"]
    assert stages["bundle"]["problems"] == []
    assert "torchrec" in stages["bundle"]["checked"]["loaded"]
    assert "Redis server v=" in stages["install"]["redis_server"]
    assert not stages["environment"]["cuda_available"]
    tests = stages["tests"]["tests"]
    assert tests and all(r["outcome"] == "skipped" and "CUDA is not available" in r["message"] for r in tests.values())
    for policy in ("local", "lru-prefetch", "bagpipe"):
        row = stages["bench"]["policies"][policy]
        assert row["samples_per_s"] > 0 and set(row["trainer_phase_s"]) >= {"install", "forward", "optimizer"}
    assert (tmp_path / "out" / "bench-report.md").exists()
