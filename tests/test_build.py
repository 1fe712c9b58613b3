"""The build and the loader: build metadata, useful load errors, and the CMake build of the same ops."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pydc
from pydc import extension

ROOT = Path(__file__).resolve().parents[1]


def test_ops_are_registered_after_import():
    assert extension.has_ops(), extension.load_error()
    assert extension.load_error() == ""
    assert hasattr(torch.ops.pydc, "sobel_normalize")


def test_build_info_matches_running_torch():
    info = extension.build_info()
    assert set(info) >= {"torch", "cuda", "cuda_archs", "python", "with_cuda"}
    assert info["torch"] == torch.__version__
    if info["with_cuda"]:
        assert info["cuda"] and info["cuda_archs"]
        # A CUDA build registers CUDA kernels even where no GPU is visible.
        assert torch._C._dispatch_has_kernel_for_dispatch_key("pydc::sobel_normalize", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pydc::sobel_normalize", "CPU")


def test_mismatch_message_names_both_versions_and_the_fix():
    recorded = {"torch": "2.0.0+cu118", "cuda": "11.8", "cuda_archs": "8.0", "python": "3.10.1"}
    message = extension._describe_mismatch(recorded)
    assert "built for torch 2.0.0+cu118" in message and "CUDA 11.8" in message and "Python 3.10.1" in message
    assert f"you have torch {torch.__version__}" in message
    assert "no build of pydc._C was found" in extension._describe_mismatch(None)
    assert "make build" in extension.REBUILD_HINT


def test_missing_extension_fails_usefully(tmp_path):
    # A copy of the Python package without the compiled library: importing works, using an op explains why not.
    package = tmp_path / "pydc"
    shutil.copytree(ROOT / "pydc", package, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    script = textwrap.dedent("""
        import warnings, torch, pydc
        assert not pydc.extension.has_ops()
        print(pydc.extension.load_error())
        try:
            pydc.extension.assert_has_ops()
        except RuntimeError as error:
            print("raised:", error)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = pydc.ops.sobel_normalize(torch.randint(0, 256, (1, 3, 5, 5), dtype=torch.uint8))
        print("fallback shape", tuple(out.shape), caught[0].message)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "rebuild with" in result.stdout and "raised:" in result.stdout
    assert "fallback shape (1, 2, 5, 5)" in result.stdout and "pure-torch reference" in result.stdout


@pytest.mark.slow
def test_cmake_cpu_build_loads_with_load_library(tmp_path):
    cmake = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake")
    assert cmake is not None, "cmake is a dev requirement (requirements/dev.txt)"
    build = tmp_path / "cmake-build"
    configure = [cmake, "-S", str(ROOT), "-B", str(build), "-DWITH_CUDA=OFF",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    for command in (configure, [cmake, "--build", str(build), "-j", "2"]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    library = build / "libpydc_ops.so"
    assert library.exists()
    # A fresh interpreter: this one already registered the pydc namespace through pydc._C.
    script = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({str(library)!r})
        images = torch.randint(0, 256, (2, 3, 6, 7), dtype=torch.uint8)
        out = torch.ops.pydc.sobel_normalize(images, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], None)
        x = (images.double() / 255 - torch.tensor([0.5, 0.4, 0.3]).double().view(1, 3, 1, 1)) \\
            / torch.tensor([0.2, 0.25, 0.3]).double().view(1, 3, 1, 1)
        kernels = torch.tensor([[[1, 0, -1], [2, 0, -2], [1, 0, -1]], [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]])
        expected = torch.nn.functional.conv2d(x.mean(1, keepdim=True), kernels.double().unsqueeze(1), padding=1)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
        torch.set_num_threads(2)
        assert torch.ops.pydc.cpu_parallel_threads() == 2, "built without OpenMP: pydc's loops run serially"
        print("ok", tuple(out.shape))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ok (2, 2, 6, 7)" in result.stdout


def test_library_from_another_pydc_version_is_refused(tmp_path):
    # The package's version moves on (a pull, a reinstall of the Python files only) while the compiled library
    # stays: the loader refuses it like one built for another torch, naming both versions.
    if "pydc" not in extension.build_info():
        pytest.skip("this build of pydc._C predates the recorded pydc version; rebuild it")
    package = tmp_path / "pydc"
    shutil.copytree(ROOT / "pydc", package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "_version.py").write_text('__version__ = "99.0.0"\n')
    script = "import pydc; print(pydc.extension.has_ops()); print(pydc.extension.load_error())"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    loaded, message = result.stdout.split("\n", 1)
    assert loaded == "False"
    assert f"pydc {pydc.__version__}; you have" in message and "pydc 99.0.0" in message and "rebuild with" in message
