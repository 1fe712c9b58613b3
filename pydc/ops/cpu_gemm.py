"""Which BLAS computes the float32 score GEMMs of the CPU k-means kernels (kmeans_assign and the bounded
assignment of bounded k-means): torch's own (MKL in the pip wheels) or scipy's (OpenBLAS in the pip wheels),
chosen once per process on the machine where it runs.

No one BLAS is fastest everywhere: on an AMD EPYC (Zen 4) capped at AVX2, MKL's sgemm ran the k-means block
at about half the rate of OpenBLAS's Haswell kernel, while at AVX-512 MKL was ahead (issue 12). So the choice
is measured, not fixed:

    PYDC_CPU_GEMM=auto   (default) time one block of the kernels' shape, 4096 x 1024 x 256 (DeepCluster's
                         PCA width), run as they run it (256 rows per GEMM, one GEMM per thread at a time), with
                         both BLAS, alternating, fastest of 3 rounds each (~0.1-0.3 s once per process), and keep
                         scipy's only when it is more than SCIPY_MARGIN faster: torch's needs no second library
    PYDC_CPU_GEMM=torch  torch's BLAS, no measurement and no scipy import
    PYDC_CPU_GEMM=scipy  scipy's BLAS (an error when scipy is not installed)

The choice is made on the first CPU k-means call through pydc (pydc.ops.kmeans.kmeans_assign,
pydc.cluster.kmeans) or by calling use_cpu_gemm(); code calling torch.ops.pydc.kmeans_assign directly gets
torch's BLAS until then. The kernels run one single-threaded GEMM per thread of torch's pool (256 rows each,
folded while they are in the core's cache): torch's BLAS sees a nested OpenMP region and stays on its thread;
scipy's OpenBLAS has one global thread count, which the kernel holds to 1 for the pass and gives back after, so
that its own pool never runs beside torch's (pydc/__init__.py also shortens OpenBLAS's busy-wait). The labels do not depend on the BLAS:
the float32 GEMM only ranks centroids and near-ties are settled in float64 (csrc/ops/cpu/kmeans_cpu.h).
"""

from __future__ import annotations

import os

from pydc.ops._registry import HAS_OPS

ENV_VAR = "PYDC_CPU_GEMM"
CHOICES = ("auto", "torch", "scipy")
MEASURE_SHAPE = (4096, 1024, 256)  # (points, centroids, features) of one block: kmeans_kernel.cpp's block size
MEASURE_ROUNDS = 3
SCIPY_MARGIN = 0.95  # auto keeps scipy's BLAS only below this fraction of torch's time

_chosen: str | None = None
_report: dict = {}


def requested(value: str | None = None) -> str:
    """The validated request: `value`, or PYDC_CPU_GEMM (default "auto"); ValueError for anything else."""
    source = "use_cpu_gemm" if value is not None else ENV_VAR
    value = os.environ.get(ENV_VAR, "auto") if value is None else value
    normalised = value.strip().lower() if isinstance(value, str) else value
    if normalised not in CHOICES:
        raise ValueError(f"{source}: expected one of {', '.join(CHOICES)} (the BLAS of pydc's CPU k-means GEMMs), "
                         f"got {value!r}")
    return normalised


def _scipy_sgemm():
    """scipy.linalg.cython_blas's sgemm capsule, or None without scipy."""
    try:
        from scipy.linalg.cython_blas import __pyx_capi__ as blas
    except ImportError:
        return None
    return blas.get("sgemm")


def measure() -> tuple[float, float]:
    """(torch's, scipy's) fastest seconds for one MEASURE_SHAPE block GEMM (needs scipy's sgemm set)."""
    from pydc import _C

    return tuple(_C.time_cpu_gemms(*MEASURE_SHAPE, MEASURE_ROUNDS))


def pick(torch_s: float, scipy_s: float) -> str:
    """auto's rule: scipy only when clearly faster."""
    return "scipy" if scipy_s < SCIPY_MARGIN * torch_s else "torch"


def use_cpu_gemm(choice: str | None = None) -> str:
    """Selects the BLAS of the CPU k-means GEMMs for this process: `choice` ("auto", "torch" or "scipy"), or
    PYDC_CPU_GEMM when None (see the module docstring). Returns the BLAS in use: "torch" or "scipy".
    ValueError for an unknown choice; RuntimeError for "scipy" without scipy's BLAS."""
    global _chosen, _report
    want = requested(choice)
    if not HAS_OPS:  # the pure-torch reference runs, with torch's matmul
        _chosen, _report = "torch", {"requested": want, "reason": "compiled ops not loaded"}
        return _chosen
    from pydc import _C

    sgemm = _scipy_sgemm() if want != "torch" else None
    if want == "scipy" and sgemm is None:
        raise RuntimeError(f"{ENV_VAR}=scipy: scipy.linalg.cython_blas is not importable (is scipy installed?); "
                           "set it to auto or torch")
    _C.set_cpu_sgemm(sgemm)  # None clears it: then torch's BLAS is the only one
    report = {"requested": want}
    if want == "auto" and sgemm is not None:
        torch_s, scipy_s = measure()
        chosen = pick(torch_s, scipy_s)
        report.update(torch_s=torch_s, scipy_s=scipy_s, shape=list(MEASURE_SHAPE))
    else:
        chosen = "scipy" if want == "scipy" else "torch"
        report["reason"] = "forced" if want != "auto" else "scipy not installed"
    _C.set_cpu_gemm(chosen)
    report["threads_settable"] = bool(_C.cpu_sgemm_threads_settable()) if chosen == "scipy" else None
    _chosen, _report = chosen, report
    return chosen


def ensure_cpu_gemm() -> str:
    """The BLAS in use, choosing it first (use_cpu_gemm()) if this process has not yet."""
    return _chosen if _chosen is not None else use_cpu_gemm()


def cpu_gemm_report() -> dict:
    """What was chosen and why, for pydc.info and benchmark records: {"gemm": "torch" | "scipy" | None (not yet
    chosen), "requested": ..., and with auto the two measured times}."""
    return {"gemm": _chosen, **_report}
