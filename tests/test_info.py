"""`python -m pydc.info` and `pydc.info()`: every field checked against the same fact found another way."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pydc
import pydc.info as INFO
from pydc import extension

ROOT = Path(__file__).resolve().parents[1]


def _run_info(*flags, cwd: Path, pythonpath: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pydc.info", *flags], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(pythonpath)})


def _ops_defined_in_sources() -> set[str]:
    """The op names the schemas in csrc/ops/*.cpp define (m.def("name(...")), read from the sources."""
    names = set()
    for source in (ROOT / "csrc" / "ops").glob("*.cpp"):
        names |= set(re.findall(r'm\.def\(\s*"(\w+)\(', source.read_text()))
    return names


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    result = _run_info("--json", cwd=tmp_path_factory.mktemp("info"))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_pydc_info_is_callable_and_returns_the_report():
    assert pydc.info is INFO and callable(pydc.info)
    assert set(pydc.info()) == {"pydc", "library", "built_for", "running", "cpu_isa", "ops", "backends",
                                "devices"}


def test_version_location_and_library(report):
    assert report["pydc"] == {"version": pydc.__version__, "path": str(ROOT / "pydc")}
    assert report["library"] == {"loaded": True, "error": ""}
    built = extension.build_info()
    assert report["built_for"]["torch"] == built["torch"] == torch.__version__
    assert report["built_for"]["with_cuda"] == built["with_cuda"]
    assert report["built_for"]["python"] == built["python"]
    assert report["built_for"]["cuda_archs"] == built["cuda_archs"].replace(";", " ").split()
    assert report["running"] == {"torch": torch.__version__, "cuda": torch.version.cuda or "",
                                 "python": platform.python_version()}


def _kernels_registered_in(folder: str) -> set[str]:
    """The op names that csrc/ops/<folder> registers kernels for (m.impl("name", ...)), read from the sources."""
    names = set()
    for source in (ROOT / "csrc" / "ops" / folder).glob("*.c*"):
        names |= set(re.findall(r'm\.impl\(\s*"(\w+)"', source.read_text()))
    return names


def test_every_op_with_its_cpu_and_cuda_kernels(report):
    assert set(report["ops"]) == _ops_defined_in_sources()
    with_cuda = extension.build_info()["with_cuda"]
    cpu_kernels, cuda_kernels = _kernels_registered_in("cpu"), _kernels_registered_in("cuda")
    for name, op in report["ops"].items():
        if op["family"] == "cpu_capability":  # read or set the ISA level: one kernel for every device
            assert name.endswith("capability") or name.startswith("cpu_"), name
            assert op["any_device"] and not (op["cpu"] or op["cuda"]), name
            continue
        assert op["family"] in {"sobel", "pca", "kmeans", "odc"} and name.startswith(op["family"] + "_")
        assert op["cpu"] is (name in cpu_kernels) and not op["any_device"], name
        # a CUDA build registers CUDA kernels even with no GPU visible
        assert op["cuda"] is (with_cuda and name in cuda_kernels), name


def test_cpu_isa(report):
    isa = report["cpu_isa"]
    assert isa["torch"] == torch.backends.cpu.get_cpu_capability()
    assert isa["cpu"] == INFO.cpu_isa_level(INFO._cpu_flags())
    query = getattr(torch.ops.pydc, "cpu_capability", None) or getattr(pydc._C, "cpu_capability", None)
    if query is None:  # a library without run-time ISA dispatch runs baseline code
        assert isa["kernels"].startswith("DEFAULT") and "not dispatched" in isa["kernels"]
    else:
        assert isa["kernels"] == str(query())


def test_cpu_isa_level_from_flags():
    assert INFO.cpu_isa_level({"sse2", "avx", "avx2", "fma"}) == "AVX2"
    assert INFO.cpu_isa_level({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}) == "AVX512"
    assert INFO.cpu_isa_level({"avx2", "fma", "avx512f"}) == "AVX2"  # AVX-512 F alone is not ATen's AVX512
    assert INFO.cpu_isa_level({"sse2", "avx"}) == "DEFAULT"


def test_optional_backends(report):
    backends = report["backends"]
    assert set(backends) == {"dali", "faiss-cpu", "faiss-gpu", "torchcodec"}
    for name, module in (("dali", "nvidia.dali"), ("faiss-cpu", "faiss"), ("torchcodec", "torchcodec")):
        installed = importlib.util.find_spec(module.split(".")[0]) is not None and (
            module == "faiss" or importlib.util.find_spec(module) is not None)
        assert backends[name]["available"] is installed, (name, backends[name])
        if installed:
            assert backends[name]["version"] == importlib.import_module(module).__version__
        else:
            assert backends[name]["error"]
    if backends["faiss-cpu"]["available"]:
        import faiss

        assert backends["faiss-gpu"]["available"] is hasattr(faiss, "StandardGpuResources")


def test_devices(report):
    devices = report["devices"]
    assert devices["cpu"]["logical_cores"] == os.cpu_count()
    assert len(devices["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    archs = extension.build_info()["cuda_archs"].replace(";", " ").split()
    for device in devices["cuda"]:
        major, minor = torch.cuda.get_device_capability(device["index"])
        assert device["capability"] == f"{major}.{minor}"
        assert device["compiled_for"] is (device["capability"] in archs)


def test_text_report_names_every_field(report, tmp_path):
    result = _run_info(cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "found in sys.modules" not in result.stderr, result.stderr  # runpy: `import pydc` loaded pydc.info
    text = result.stdout
    assert f"pydc                        {pydc.__version__}" in text
    assert f"torch {torch.__version__}" in text and "CPU kernels ISA" in text
    for name in report["ops"]:
        kernels = "any device" if report["ops"][name]["any_device"] else "CPU (yes|no)\\s+CUDA (yes|no)"
        assert re.search(rf"^  {name}\s+\w+\s+{kernels}$", text, re.MULTILINE), name
    for backend in ("dali", "faiss-cpu", "faiss-gpu", "torchcodec"):
        assert f"  {backend}" in text


def test_info_without_the_compiled_library(tmp_path):
    # A copy of the package without pydc/_C*.so: the report says so and why, instead of failing.
    shutil.copytree(ROOT / "pydc", tmp_path / "pydc", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    result = _run_info("--json", cwd=tmp_path, pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["library"]["loaded"] is False and "rebuild with" in report["library"]["error"]
    assert report["built_for"] is None and report["cpu_isa"]["kernels"].startswith("none")


def test_cpu_identity_reads_the_first_processor(tmp_path):
    # two processors that differ: the identity is the first one's; the quality suite and `pydc.info` both read it
    block = "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n" \
            "model name\t: {name}\nflags\t\t: {flags}\n\n"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(block.format(n=0, family=23, model=49, name="AMD EPYC 7B12", flags="fpu sse2 avx2 fma")
                       + block.format(n=1, family=25, model=17, name="other", flags="fpu avx512f"))
    identity = INFO.cpu_identity(cpuinfo)
    assert identity == {"model_name": "AMD EPYC 7B12", "family": "23", "model": "49",
                        "flags": {"fpu", "sse2", "avx2", "fma"}}
    assert INFO.cpu_isa_level(identity["flags"]) == "AVX2"
    assert INFO.cpu_identity(tmp_path / "absent") == {"model_name": None, "family": None, "model": None,
                                                       "flags": set()}
