"""Build of pydc and its compiled ops library, `pydc._C`.

CUDA sources are compiled whenever a CUDA toolkit is found (CUDA_HOME, or /usr/local/cuda) or FORCE_CUDA=1,
whether or not a GPU is visible: a build machine without a GPU still catches every compile error.
PYDC_CPU_ONLY=1 builds the CPU kernels only. The versions this build is made for are written to
pydc/_build_info.json and compiled into the extension, so that the loader can say what to rebuild.
"""

import glob
import json
import os
import platform
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _locate_cuda_home() -> str | None:
    """The CUDA toolkit to build with: CUDA_HOME (or CUDA_PATH) if set; else the toolkit of the nvcc on PATH
    (followed through symlinks; a wrapper script outside any toolkit is passed over); else /usr/local/cuda
    when it holds nvcc. The choice is exported as CUDA_HOME and printed. This must run before torch's
    cpp_extension is imported, since that module reads CUDA_HOME once at import time. FORCE_CUDA=1 with no
    toolkit found is an error here rather than a CPU-only build that fails every CUDA test later."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append((Path(os.path.realpath(nvcc)).parent.parent, "the nvcc on PATH"))
    candidates.append((Path("/usr/local/cuda"), "the default location"))
    for root, source in candidates:
        if (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file():
            os.environ["CUDA_HOME"] = str(root)
            print(f"pydc: CUDA_HOME={root} (from {source})")
            return str(root)
    if _env_flag("FORCE_CUDA"):
        raise SystemExit("pydc: FORCE_CUDA=1 but no CUDA toolkit was found (no CUDA_HOME, no nvcc on PATH inside a "
                         "toolkit, nothing in /usr/local/cuda); set CUDA_HOME to the toolkit's root")
    return None


CPU_ONLY = _env_flag("PYDC_CPU_ONLY")
CUDA_HOME = None if CPU_ONLY else _locate_cuda_home()
WITH_CUDA = not CPU_ONLY and (CUDA_HOME is not None or _env_flag("FORCE_CUDA"))

import torch  # noqa: E402  (after CUDA_HOME is settled)
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _pip_cuda_include_dirs() -> list[str]:
    """Headers of the pip CUDA packages (nvidia/cu13/include holds cuBLAS, cuSPARSE, ...), which the
    toolkit under /usr/local/cuda may lack."""
    dirs = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            candidate = Path(entry) / sub
            if candidate.is_dir():
                dirs.append(str(candidate))
    return sorted(set(dirs))


def _cuda_archs() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")


def _sources() -> tuple[list[str], list[str]]:
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/ops/cpu/*.cpp"))
    cuda = sorted(glob.glob("csrc/ops/cuda/*.cu") + glob.glob("csrc/ops/cuda/*.cpp"))
    return cpp, cuda


def _build_info() -> dict:
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if WITH_CUDA else "",
        "cuda_archs": _cuda_archs() if WITH_CUDA else "",
        "python": platform.python_version(),
        "with_cuda": WITH_CUDA,
    }


def _extension():
    cpp_sources, cuda_sources = _sources()
    info = _build_info()
    Path(ROOT, "pydc", "_build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    macros = [
        ("PYDC_TORCH_VERSION", f'"{info["torch"]}"'),
        ("PYDC_CUDA_VERSION", f'"{info["cuda"]}"'),
        ("PYDC_CUDA_ARCHS", f'"{info["cuda_archs"]}"'),
        ("PYDC_PYTHON_VERSION", f'"{info["python"]}"'),
    ]
    cxx_flags = ["-O3"]
    include_dirs = [str(ROOT / "csrc")]
    if WITH_CUDA:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _cuda_archs())
        macros.append(("PYDC_WITH_CUDA", None))
        include_dirs += _pip_cuda_include_dirs()
        print(f"pydc: building CPU and CUDA kernels (CUDA_HOME={CUDA_HOME}, archs {_cuda_archs()}): "
              f"{len(cpp_sources)} C++ and {len(cuda_sources)} CUDA sources")
        return CUDAExtension(
            "pydc._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr",
                                                           "-lineinfo"]},
        )
    reason = "PYDC_CPU_ONLY=1" if CPU_ONLY else "no CUDA toolkit found (set CUDA_HOME or FORCE_CUDA=1)"
    print(f"pydc: building CPU kernels only ({reason}): {len(cpp_sources)} C++ sources")
    return CppExtension("pydc._C", cpp_sources, include_dirs=include_dirs, define_macros=macros,
                        extra_compile_args={"cxx": cxx_flags})


setup(
    name="pydc",
    version="0.1.0",
    description="DeepCluster and Online Deep Clustering with fused C++/CUDA ops",
    packages=find_packages(include=["pydc", "pydc.*"]),
    package_data={"pydc": ["_build_info.json"]},
    python_requires=">=3.11",
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
