"""Which GEMM computes the float32 score products of the CPU k-means kernels (kmeans_assign and the bounded
assignment of bounded k-means): torch's BLAS (MKL in the pip wheels), scipy's (OpenBLAS in the pip wheels) or
pydc's own (cpu_kernels' gemm_abt_packed: a pass's centroids packed into panels once, the points of a block
per call; 6 x 16 tiles of fused multiply-adds at AVX2, 6 x 32 at AVX-512), chosen once per process on the
machine where it runs.

No one GEMM is fastest everywhere: on an AMD EPYC (Zen 4) capped at AVX2, MKL's sgemm once ran the k-means
block at about half the rate of OpenBLAS's Haswell kernel, while at AVX-512 MKL was ahead (issue 12); pydc's
ran it in 10.9-11.1 ms against MKL's 11.6-12.8 there (2 threads), and is slow at the baseline level (SSE2, no
FMA: 30-40 ms). So the choice is measured, not fixed:

    PYDC_CPU_GEMM=auto   (default) time one block of the kernels' shape, 4096 x 1024 x 256 (DeepCluster's
                         PCA width), run as they run it (256 rows per GEMM, one GEMM per thread at a time),
                         with each GEMM, alternating, fastest of 5 rounds each (~0.2-0.4 s once per process),
                         and keep the fastest only when it is more than MARGIN faster than torch's (no second
                         library) in that measurement and again in a second one, taken only then: on a shared
                         VM one measurement picked pydc's GEMM (14.0 ms against MKL's 17.5) where its k-means
                         runs then took ~10% longer than with MKL (6.4-7.6 s against 6.1-6.8 s, unstructured
                         100k x 256, k = 1000; Intel Xeon family 6 model 207 capped at AVX2, 2 threads)
    PYDC_CPU_GEMM=torch  torch's BLAS, no measurement and no scipy import
    PYDC_CPU_GEMM=scipy  scipy's BLAS (an error when scipy is not installed)
    PYDC_CPU_GEMM=pydc   pydc's own

The choice is made on the first CPU k-means call through pydc (pydc.ops.kmeans.kmeans_assign,
pydc.cluster.kmeans) or by calling use_cpu_gemm(); code calling torch.ops.pydc.kmeans_assign directly gets
torch's BLAS until then. The kernels run one single-threaded GEMM per thread of torch's pool (256 rows each,
folded while they are in the core's cache): torch's BLAS sees a nested OpenMP region and stays on its thread;
scipy's OpenBLAS has one global thread count, which the kernel holds to 1 for the pass and gives back after, so
that its own pool never runs beside torch's (pydc/__init__.py also shortens OpenBLAS's busy-wait). The labels do not depend on the BLAS:
the float32 GEMM only ranks centroids and near-ties are settled in float64 (csrc/ops/cpu/kmeans_cpu.h).
The float32 distances do: pydc's GEMM uses fused multiply-adds from avx2 up, so they differ by rounding
between ISA levels.

Where torch's BLAS is MKL (the x86 pip wheels), torch's GEMM packs a pass's centroids once with MKL's packed API
(cblas_sgemm_pack, looked up in torch's libraries at run time; `mkl_packed` in the report) and multiplies every
block of points by them with cblas_sgemm_compute, instead of at::mm repacking the 1 MB of 1000 x 256
centroids for every 256-row block: kmeans_assign at 100k x 256, k = 1000 took 0.926x the time at avx512 and
0.961x capped at AVX2 (medians of 25 alternating pairs; Intel Xeon family 6 model 207, 2 threads).
"""

from __future__ import annotations

import os

import torch

from pydc.ops._registry import HAS_OPS

ENV_VAR = "PYDC_CPU_GEMM"
CHOICES = ("auto", "torch", "scipy", "pydc")
MEASURE_SHAPE = (4096, 1024, 256)  # (points, centroids, features) of one block: kmeans_kernel.cpp's block size
# 5, as for the PCA Gram's syrk (pydc.ops.pca.SYRK_MEASURE_ROUNDS): there 3 rounds on a VM slowed ~4x for
# the measurement's duration picked the slower syrk once; two more rounds here cost ~0.1 s once per process
MEASURE_ROUNDS = 5
MARGIN = 0.95  # auto keeps another GEMM than torch's only below this fraction of torch's time

_chosen: str | None = None
_report: dict = {}


def choice(raw, choices: tuple[str, ...], source: str, what: str, aliases: dict[str, str] | None = None) -> str:
    """A setting of pydc's CPU kernels (this module's PYDC_CPU_GEMM, pydc.ops.pca's PYDC_CPU_SYRK) as one of
    `choices`: stripped, lower-cased, mapped through `aliases`; ValueError naming `source` and `what` for
    anything else."""
    normalised = str(raw).strip().lower()
    normalised = (aliases or {}).get(normalised, normalised)
    if normalised not in choices:
        raise ValueError(f"{source}: expected one of {', '.join(choices)} ({what}), got {raw!r}")
    return normalised


def requested(value: str | None = None) -> str:
    """The validated request: `value`, or PYDC_CPU_GEMM (default "auto"); ValueError for anything else."""
    source = "use_cpu_gemm" if value is not None else ENV_VAR
    raw = os.environ.get(ENV_VAR, "auto") if value is None else value
    return choice(raw, CHOICES, source, "the BLAS of pydc's CPU k-means GEMMs")


def _scipy_sgemm():
    """scipy.linalg.cython_blas's sgemm capsule, or None without scipy."""
    try:
        from scipy.linalg.cython_blas import __pyx_capi__ as blas
    except ImportError:
        return None
    return blas.get("sgemm")


def measure() -> dict[str, float]:
    """{"torch", "scipy", "pydc": fastest seconds for one MEASURE_SHAPE block GEMM}; scipy's is inf when no
    scipy sgemm is set."""
    from pydc import _C

    return dict(zip(("torch", "scipy", "pydc"), _C.time_cpu_gemms(*MEASURE_SHAPE, MEASURE_ROUNDS)))


def pick(seconds: dict[str, float]) -> str:
    """auto's rule: the fastest GEMM when it is clearly faster than torch's, else torch's."""
    fastest = min(seconds, key=seconds.get)
    return fastest if seconds[fastest] < MARGIN * seconds["torch"] else "torch"


def use_cpu_gemm(choice: str | None = None) -> str:
    """Selects the GEMM of the CPU k-means passes for this process: `choice` ("auto", "torch", "scipy" or
    "pydc"), or PYDC_CPU_GEMM when None (see the module docstring). Returns the GEMM in use: "torch", "scipy"
    or "pydc". ValueError for an unknown choice; RuntimeError for "scipy" without scipy's BLAS."""
    global _chosen, _report
    want = requested(choice)
    if not HAS_OPS:  # the pure-torch reference runs, with torch's matmul
        _chosen, _report = "torch", {"requested": want, "reason": "compiled ops not loaded"}
        return _chosen
    from pydc import _C

    sgemm = _scipy_sgemm() if want in ("auto", "scipy") else None
    if want == "scipy" and sgemm is None:
        raise RuntimeError(f"{ENV_VAR}=scipy: scipy.linalg.cython_blas is not importable (is scipy installed?); "
                           "set it to auto or torch")
    _C.set_cpu_sgemm(sgemm)  # None clears it: then torch's BLAS is the only one
    report = {"requested": want}
    if want == "auto":
        seconds = measure()
        chosen = pick(seconds)
        report.update({f"{name}_s": value for name, value in seconds.items()}, shape=list(MEASURE_SHAPE))
        if chosen != "torch":  # another BLAS only when a second measurement agrees (module docstring)
            again = measure()
            report.update({f"confirm_{name}_s": value for name, value in again.items()})
            if pick(again) != chosen:
                chosen = "torch"
        if sgemm is None:
            report["scipy"] = "not installed"
    else:
        chosen = want
        report["reason"] = "forced"
    _C.set_cpu_gemm(chosen)
    report["mkl_packed"] = chosen == "torch" and bool(_C.has_mkl_packed_sgemm())
    report["threads_settable"] = bool(_C.cpu_sgemm_threads_settable()) if chosen == "scipy" else None
    _chosen, _report = chosen, report
    return chosen


def ensure_cpu_gemm() -> str:
    """The BLAS in use, choosing it first (use_cpu_gemm()) if this process has not yet."""
    return _chosen if _chosen is not None else use_cpu_gemm()


def cpu_gemm_report() -> dict:
    """What was chosen and why, for pydc.info and benchmark records: {"gemm": "torch" | "scipy" | "pydc" | None
    (not yet chosen), "requested": ..., "mkl_packed": whether torch's GEMM runs on MKL's packed centroids, and
    with auto the measured times}."""
    return {"gemm": _chosen, **_report}


def gemm_abt(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out = a @ b.T with the GEMM selected for the CPU k-means passes (torch's, scipy's or pydc's), on the
    calling thread, as the kernels call it; for tests and measurements. a (m, d), b (n, d), out (m, n): CPU
    float32 with unit column stride (rows may be further apart), out not overlapping a or b. Returns out."""
    from pydc import _C

    for name, t in (("out", out), ("a", a), ("b", b)):
        if t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 2:
            raise ValueError(f"gemm_abt: expected 2-D CPU float32 {name}, got {t.dtype} of shape "
                             f"{tuple(t.shape)} on {t.device}")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"gemm_abt: expected {name} with unit column stride, got strides {t.stride()}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"gemm_abt: expected a and b with the same number of features, got {a.shape[1]} and "
                         f"{b.shape[1]}")
    if tuple(out.shape) != (a.shape[0], b.shape[0]):
        raise ValueError(f"gemm_abt: expected out of shape ({a.shape[0]}, {b.shape[0]}), got {tuple(out.shape)}")
    _C.cpu_gemm_abt(out.data_ptr(), out.stride(0), a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0),
                    a.shape[0], b.shape[0], a.shape[1])
    return out
