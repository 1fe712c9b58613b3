"""Which ISA level the CPU kernels run at, and a way to choose it.

The CPU inner loops of every op (k-means arg-min and update, PCA centring and normalisation, the Sobel stem,
the ODC passes) are compiled three times, for the x86-64 baseline ("default"), AVX2 + FMA ("avx2") and
AVX-512 F/BW/VL/DQ ("avx512"), and the library picks the highest level the CPU supports when it loads, as
ATen does with its CPU_CAPABILITY kernels. The environment variable PYDC_CPU_CAPABILITY=default|avx2|avx512,
set before pydc is imported, caps that level (as ATEN_CPU_CAPABILITY caps ATen's); an unknown value is
ignored with a warning. Every level computes the same results bitwise; only the speed differs. The BLAS
that runs the GEMMs (MKL or OpenBLAS) picks its own ISA: MKL_ENABLE_INSTRUCTIONS=AVX2 and
OPENBLAS_CORETYPE=Haswell cap those, ATEN_CPU_CAPABILITY=avx2 torch's own kernels.
"""

from __future__ import annotations

import contextlib

import torch

from pydc.ops._registry import HAS_OPS

LEVELS = ("default", "avx2", "avx512")


def cpu_capability() -> str:
    """The level the CPU kernels run at now ("default", "avx2" or "avx512"); "none" without compiled ops."""
    return str(torch.ops.pydc.cpu_capability()) if HAS_OPS else "none"


def cpu_supported_capability() -> str:
    """The highest level this CPU supports ("none" without compiled ops)."""
    return str(torch.ops.pydc.cpu_supported_capability()) if HAS_OPS else "none"


def cpu_vector_width() -> int:
    """Floats per vector register in the CPU loops of the level in use: 4 (baseline SSE), 8 (AVX2), 16 (AVX-512);
    0 without compiled ops. Each level's unit picks it at compile time (cpu_kernels_impl.h, PYDC_CPU_LEVEL)."""
    return int(torch.ops.pydc.cpu_vector_width()) if HAS_OPS else 0


def cpu_parallel_threads() -> int:
    """Threads one of pydc's parallel CPU loops (at::parallel_for) runs on now: torch.get_num_threads() when
    the library was built with OpenMP as setup.py builds it, 1 when it was not (every pydc loop serial); 0
    without compiled ops."""
    return int(torch.ops.pydc.cpu_parallel_threads()) if HAS_OPS else 0


def set_cpu_capability(level: str) -> None:
    """Runs the CPU kernels at `level` from now on (tests, benchmarks). Raises ValueError for an unknown
    level and RuntimeError for one the CPU does not support."""
    if level not in LEVELS:
        raise ValueError(f"set_cpu_capability: expected one of {LEVELS}, got {level!r}")
    if not HAS_OPS:
        raise RuntimeError("set_cpu_capability: pydc's compiled ops are not loaded")
    torch.ops.pydc.set_cpu_capability(level)


def supported_levels() -> list[str]:
    """Every level this CPU can run, lowest first."""
    top = cpu_supported_capability()
    return list(LEVELS[: LEVELS.index(top) + 1]) if top in LEVELS else []


@contextlib.contextmanager
def cpu_capability_level(level: str):
    """Runs the body with the CPU kernels at `level`, then restores the previous level."""
    previous = cpu_capability()
    set_cpu_capability(level)
    try:
        yield
    finally:
        set_cpu_capability(previous)
