"""pydc as another project gets it: sdist -> wheel -> `pip install` into a virtual environment of only torch.

The chain, in the order a user or a packager runs it:
1. An sdist made from a copy of the checkout (the checkout itself is never written to: setup.py writes
   pydc/_build_info.json and pip writes build/ wherever it builds).
2. A wheel built from the unpacked sdist with `pip wheel --no-build-isolation --no-deps`, against the torch
   running these tests, so the sdist is shown to hold everything the build needs. PYDC_CPU_ONLY=1 keeps this
   to the 11 C++ files (the CUDA kernels would add the nvcc compiles); the CUDA build is the same setup.py
   with a toolkit found, which `make build` and CI exercise. This compile is most of the test's time.
3. A fresh virtual environment with only torch and the packages torch itself requires. Installing torch
   2.14.1 there from the package index would copy ~6 GB (torch, triton and the CUDA wheels) on every run, so
   the environment instead gets a folder of links to exactly those distributions of this interpreter (found
   from torch's declared requirements, with their dist-info, so pip sees torch as installed) on its path
   through a .pth file. Nothing else of this interpreter is visible: the test first checks that numpy does
   not import.
4. `pip install --no-build-isolation <wheel>` into it: pip must resolve pydc's runtime dependencies (numpy,
   scipy, scikit-learn, ...) from the wheel's metadata alone, from the package index.
5. From a folder outside the checkout, with that environment's Python: import every public module, run each
   op against its reference, torch.compile(fullgraph=True) over SobelStem + a conv
   (installed_package_check.py), one epoch of `python -m pydc.train` on a tiny image folder, and
   `python -m pydc.info`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

import pydc
from tests.test_train import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
# What a copy of the checkout leaves out: build outputs, environments, run outputs, version control.
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "out", "*.egg-info",
                                      "__pycache__", ".pytest_cache", ".benchmarks", "_C*.so",
                                      "_build_info.json", "results")


def _run(command, *, cwd, timeout, env=None, what):
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (f"{what} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                                    f"{result.stderr[-6000:]}")
    return result


def _requirement_closure(root: str) -> list[importlib.metadata.Distribution]:
    """The installed distributions `root` needs: itself and, recursively, its requirements whose markers hold
    here (extras included, e.g. torch's cuda-toolkit[cublas, ...])."""
    found: dict[str, importlib.metadata.Distribution] = {}
    visited: set[tuple[str, frozenset]] = set()
    pending = [(root, frozenset())]
    while pending:
        name, extras = pending.pop()
        if (name.lower(), extras) in visited:
            continue
        visited.add((name.lower(), extras))
        distribution = importlib.metadata.distribution(name)
        found[distribution.metadata["Name"].lower()] = distribution
        for line in distribution.requires or []:
            requirement = Requirement(line)
            environments = [{"extra": extra} for extra in (extras | {""})]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environments):
                pending.append((requirement.name, frozenset(requirement.extras)))
    return list(found.values())


def link_distributions(distributions, target: Path) -> None:
    """Symlink the files of `distributions` into `target`, whole folders where no other distribution of this
    interpreter has files in them (namespace folders such as nvidia/ are shared with e.g. DALI: descend)."""
    owners: dict[tuple[str, ...], set[str]] = {}  # path prefix -> distributions with files under it
    site = Path(torch.__file__).resolve().parents[1]
    for distribution in importlib.metadata.distributions(path=[str(site)]):
        name = distribution.metadata["Name"].lower()  # parsed from METADATA on every access: once here
        for file in distribution.files or []:
            parts = Path(file).parts
            if parts and parts[0] != "..":  # scripts in bin/ are not needed
                for depth in range(1, len(parts) + 1):
                    owners.setdefault(parts[:depth], set()).add(name)
    wanted = {distribution.metadata["Name"].lower() for distribution in distributions}
    linked: set[tuple[str, ...]] = set()
    for distribution in distributions:
        for file in distribution.files or []:
            parts = Path(file).parts
            if not parts or parts[0] == "..":
                continue
            depths = range(1, len(parts) + 1)
            prefix = next((parts[:depth] for depth in depths if owners[parts[:depth]] <= wanted), None)
            if prefix is not None and prefix not in linked and site.joinpath(*prefix).exists():
                linked.add(prefix)
                destination = target.joinpath(*prefix)
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.symlink_to(site.joinpath(*prefix))


def make_torch_only_venv(root: Path) -> Path:
    venv.EnvBuilder(with_pip=True, symlinks=True).create(root)
    python = root / "bin" / "python"
    site_packages = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              cwd=root, timeout=60, what="venv site-packages").stdout.strip())
    overlay = root / "torch-only"
    link_distributions(_requirement_closure("torch"), overlay)
    (site_packages / "torch_only.pth").write_text(f"{overlay}\n")
    return python


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel built from it (CPU kernels), without writing into the checkout."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "checkout-copy"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCES)
    env = {**os.environ, "PYDC_CPU_ONLY": "1", "MAX_JOBS": "2"}
    _run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", work / "sdist"], cwd=source, env=env,
         timeout=300, what="setup.py sdist")
    (sdist,) = (work / "sdist").glob("pydc-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(work / "unpacked", filter="data")
    (unpacked,) = (work / "unpacked").iterdir()
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--wheel-dir",
          work / "wheels", unpacked], cwd=work, env=env, timeout=3600, what="pip wheel --no-build-isolation")
    (wheel,) = (work / "wheels").glob("pydc-*.whl")
    return {"sdist": sdist, "unpacked": unpacked, "wheel": wheel}


@pytest.fixture(scope="module")
def installed(packaged, tmp_path_factory) -> Path:
    """The Python of a fresh torch-only virtual environment with the wheel installed."""
    root = tmp_path_factory.mktemp("torch-only-venv")
    python = make_torch_only_venv(root / "venv")
    probe = subprocess.run([python, "-c", "import torch; print(torch.__version__); import numpy"], cwd=root,
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == torch.__version__, probe.stderr
    assert "No module named 'numpy'" in probe.stderr, "the torch-only environment sees more than torch"
    _run([python, "-m", "pip", "install", "--no-build-isolation", packaged["wheel"]], cwd=root, timeout=900,
         what="pip install <wheel> into the torch-only environment")
    return python


@pytest.mark.slow
def test_sdist_holds_every_build_input(packaged):
    with tarfile.open(packaged["sdist"]) as archive:
        names = {Path(*Path(name).parts[1:]).as_posix() for name in archive.getnames()}
    needed = {path.relative_to(ROOT).as_posix() for path in (ROOT / "csrc").rglob("*") if path.is_file()}
    needed |= {"setup.py", "pyproject.toml", "MANIFEST.in", "CMakeLists.txt", "README.md", "pydc/_version.py"}
    assert needed <= names, sorted(needed - names)
    assert not [name for name in names if name.endswith(".so") or name.endswith("_build_info.json")]


@pytest.mark.slow
def test_isolated_build_refuses_with_the_command_to_use(packaged, tmp_path):
    # pip's isolated build environment has no torch (pyproject.toml does not ask for one): the build stops and
    # says how to build against the environment's torch, instead of compiling against a torch pip picked.
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", tmp_path,
                             packaged["unpacked"]], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYDC_CPU_ONLY": "1"})
    assert result.returncode != 0 and not list(tmp_path.glob("*.whl"))
    assert "pip install --no-build-isolation" in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.mark.slow
def test_wheel_declares_runtime_dependencies_and_extras(packaged):
    with zipfile.ZipFile(packaged["wheel"]) as archive:
        metadata_name = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        metadata = archive.read(metadata_name).decode()
        build_info = json.loads(archive.read("pydc/_build_info.json"))
    assert build_info["pydc"] == pydc.__version__ and build_info["torch"] == torch.__version__
    assert not build_info["with_cuda"]  # PYDC_CPU_ONLY=1
    requirements = [Requirement(line.split(":", 1)[1].strip()) for line in metadata.splitlines()
                    if line.startswith("Requires-Dist:")]
    plain = {requirement.name.lower(): requirement for requirement in requirements
             if requirement.marker is None}
    for name in ("numpy", "scipy", "scikit-learn", "pillow", "tqdm", "matplotlib", "pyyaml", "torchvision"):
        assert name in plain, f"{name} missing from the wheel's Requires-Dist: {sorted(plain)}"
    assert plain["torch"].specifier.contains(torch.__version__.split("+")[0])
    extras = {line.split(":", 1)[1].strip() for line in metadata.splitlines()
              if line.startswith("Provides-Extra:")}
    assert {"dali", "faiss", "dev"} <= extras


@pytest.mark.slow
def test_installed_wheel_works_outside_the_checkout(installed, tmp_path):
    elsewhere = tmp_path / "another-project"
    elsewhere.mkdir()
    check = shutil.copy(ROOT / "tests" / "installed_package_check.py", elsewhere)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    result = _run([installed, check, ROOT], cwd=elsewhere, env=env,
                  timeout=600, what="installed_package_check.py")
    assert "all checks passed" in result.stdout, result.stdout

    info = json.loads(_run([installed, "-m", "pydc.info", "--json"], cwd=elsewhere, env=env, timeout=120,
                           what="python -m pydc.info").stdout)
    assert info["library"]["loaded"] and info["built_for"]["pydc"] == pydc.__version__
    # a CPU-only wheel: every op has a CPU kernel and none a CUDA one (the cpu_capability ops: one for any device)
    assert all((op["cpu"] or op["any_device"]) and not op["cuda"] for op in info["ops"].values()), info["ops"]

    data = make_image_folder(tmp_path / "images", per_class=8)
    output = tmp_path / "run"
    _run([installed, "-m", "pydc.train", "--data", data, "--output", output, "--epochs", "1", "--k", "3",
          "--pca-dim", "8", "--crop", "16", "--batch-size", "12", "--threads", "1", "--workers", "1",
          "--device", "cpu"], cwd=elsewhere, env=env, timeout=600, what="python -m pydc.train")
    epochs = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in epochs if "loss" in record] == [0]
    assert (output / "checkpoint.pt").exists()
