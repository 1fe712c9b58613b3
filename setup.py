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

try:
    import torch  # noqa: E402  (after CUDA_HOME is settled)
except ModuleNotFoundError as missing_torch:
    # pyproject.toml leaves torch out of the build requirements on purpose: in pip's isolated build
    # environment it would be whatever torch pip picks, and the extension would then fail to load into the
    # user's own.
    raise SystemExit("pydc compiles against the torch of the environment it is installed into, and found "
                     "none. Install torch first, then build without isolation: "
                     "`pip install --no-build-isolation <pydc source or sdist>`") from missing_torch
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
        "pydc": VERSION,
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
        ("PYDC_VERSION", f'"{info["pydc"]}"'),
        ("PYDC_TORCH_VERSION", f'"{info["torch"]}"'),
        ("PYDC_CUDA_VERSION", f'"{info["cuda"]}"'),
        ("PYDC_CUDA_ARCHS", f'"{info["cuda_archs"]}"'),
        ("PYDC_PYTHON_VERSION", f'"{info["python"]}"'),
    ]
    # -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` is compiled into this
    # library; without the flag every pydc CPU kernel ran on one thread whatever torch.set_num_threads said.
    # Linking with it records libgomp.so.1, which resolves to the copy torch has already loaded (one runtime,
    # one thread pool, so torch.set_num_threads applies to pydc's loops too).
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
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
            extra_link_args=link_flags,
        )
    reason = "PYDC_CPU_ONLY=1" if CPU_ONLY else "no CUDA toolkit found (set CUDA_HOME or FORCE_CUDA=1)"
    print(f"pydc: building CPU kernels only ({reason}): {len(cpp_sources)} C++ sources")
    return CppExtension("pydc._C", cpp_sources, include_dirs=include_dirs, define_macros=macros,
                        extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


def _read_version() -> str:
    """pydc/_version.py's __version__, read without importing pydc (which needs the library built here)."""
    namespace: dict = {}
    exec((ROOT / "pydc" / "_version.py").read_text(), namespace)
    return namespace["__version__"]


VERSION = _read_version()


def _torch_requirements() -> list[str]:
    """The torch this build compiles against, and the torchvision made for it.

    A compiled extension runs only with the torch release it was built against (the loader refuses any
    other, see pydc/extension.py), so the wheel asks for that release: `torch==2.14.1` also accepts local
    builds such as 2.14.1+cu130. torchvision's minor version follows torch's (0.29 goes with 2.14)."""
    release = torch.__version__.split("+")[0]
    major, minor = (int(part) for part in release.split(".")[:2])
    return [f"torch=={release}", f"torchvision=={major - 2}.{minor + 15}.*"]


def _dali_requirement() -> str:
    """DALI's wheels are per CUDA major version: the one of this torch's CUDA (13 when torch has none)."""
    cuda_major = (torch.version.cuda or "13").split(".")[0]
    return f"nvidia-dali-cuda{cuda_major}0>=2.0"


# Compatible ranges, not pins: pydc is meant to install into other projects' environments. The floors are the
# first releases with what pydc uses (numpy 2 ABI for scipy/scikit-learn/matplotlib wheels; scipy's
# cython_blas ?syrk capsules); requirements/*.txt pin the exact versions `make` installs and CI tests.
INSTALL_REQUIRES = _torch_requirements() + [
    "numpy>=2.0,<3",
    "scipy>=1.13",
    "scikit-learn>=1.5",
    "pillow>=10.0",
    "tqdm>=4.66",
    "matplotlib>=3.9",
    "PyYAML>=6.0",
]
EXTRAS_REQUIRE = {
    # GPU (and CPU) data loading: pydc.data's backend="dali"; without it the loaders use torchvision.
    "dali": [_dali_requirement()],
    # k-means through faiss (pydc.cluster.kmeans backend="faiss") and the PCA cross-checks in the tests.
    # faiss with GPU support is on PyPI only for CUDA 12 (faiss-gpu-cu12); for CUDA 13 take it from conda.
    "faiss": ["faiss-cpu>=1.9"],
    "dev": ["pytest>=8", "pytest-benchmark>=4", "cmake>=3.26", "ninja", "setuptools>=68", "wheel",
            "faiss-cpu>=1.9"],
}

setup(
    name="pydc",
    version=VERSION,
    description="DeepCluster and Online Deep Clustering with fused C++/CUDA ops",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pydc", "pydc.*"]),
    package_data={"pydc": ["_build_info.json"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
