"""Loading of the compiled ops library `pydc._C`.

Importing `pydc._C` registers every `torch.ops.pydc.*` kernel. When that fails, or when the library was
built for another torch or from another pydc version, the error says which versions it was built for, which
are installed, and how to rebuild, instead of an undefined-symbol message. (A library that predates the
recorded pydc version says nothing about it, and is then taken as built from this source.)
"""

from __future__ import annotations

import json
import platform
from functools import lru_cache
from pathlib import Path

import torch

from pydc._version import __version__

_BUILD_INFO_FILE = Path(__file__).with_name("_build_info.json")
REBUILD_HINT = (
    "rebuild with `make build` (or `python setup.py build_ext --inplace` with the torch you run; "
    "PYDC_CPU_ONLY=1 for CPU kernels only); for an installed pydc, reinstall it against the torch you run: "
    "`pip install --no-build-isolation --force-reinstall --no-deps <pydc source or sdist>`"
)


def _recorded_build_info() -> dict | None:
    try:
        return json.loads(_BUILD_INFO_FILE.read_text())
    except (OSError, ValueError):
        return None


def _describe_mismatch(info: dict | None) -> str:
    running = (f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}, "
               f"pydc {__version__}")
    if info is None:
        return f"no build of pydc._C was found for {running}"
    built = (f"torch {info.get('torch')} (CUDA {info.get('cuda') or 'none'}, archs "
             f"{info.get('cuda_archs') or 'none'}), Python {info.get('python')}, "
             f"pydc {info.get('pydc', '(not recorded)')}")
    return f"pydc._C was built for {built}; you have {running}"


@lru_cache(maxsize=1)
def _load() -> tuple[bool, str]:
    try:
        from pydc import _C  # noqa: F401  (registers the ops)
    except ImportError as error:  # missing file, or an ABI mismatch surfacing as an undefined symbol
        return False, f"{_describe_mismatch(_recorded_build_info())}: {error}. {REBUILD_HINT}"
    info = dict(_C.build_info())
    if info["torch"] != torch.__version__ or info.get("pydc", __version__) != __version__:
        return False, f"{_describe_mismatch(info)}. {REBUILD_HINT}"
    return True, ""


def has_ops() -> bool:
    """True when the compiled ops are loaded and match the running torch."""
    return _load()[0]


def assert_has_ops() -> None:
    loaded, message = _load()
    if not loaded:
        raise RuntimeError(message)


def load_error() -> str:
    """Why the compiled ops are unavailable ('' when they are loaded)."""
    return _load()[1]


def build_info() -> dict:
    """pydc version, and the versions and CUDA archs the loaded extension was compiled for."""
    assert_has_ops()
    from pydc import _C

    return dict(_C.build_info())


def has_cuda_kernels() -> bool:
    return has_ops() and bool(build_info()["with_cuda"])
