"""The PCA-whitening ops: `torch.ops.pydc.pca_accumulate` and `torch.ops.pydc.pca_transform`.

Semantics, spelled out in plain torch by the `*_reference` functions (the test oracle and the fallback):

pca_accumulate(batch, shift, sum, gram, nonfinite_rows) -> None, updating its last three arguments in place
    (declared in the schema as `Tensor(a!) sum, Tensor(b!) gram, Tensor(c!) nonfinite_rows`):
    c = batch - shift, as the float64 difference rounded once to the GEMM type (the CPU kernel computes it in
    float32 against shift split as hi + lo, within ~1 float32 ulp of that); rows of `batch` holding
    NaN or +-Inf are left out (treated as zero rows) and counted; sum += c.sum(0); gram += c^T c on and above the
    diagonal; nonfinite_rows += number of rows left out. Like BLAS syrk with uplo="U", only the upper triangle
    of gram is defined: on the CPU a gram of the GEMM type is updated by a syrk once use_cpu_syrk has run (it
    runs on the first CPU call through this module; a float32 gram by pydc's own syrk, scipy's BLAS one or
    MKL's, whichever it measured fastest, a float64 one by scipy's), which leaves the strict lower triangle as
    it was, and otherwise by GEMM row panels gram[i:i+256, i:], which skip most of it; the CUDA kernel adds
    a float32 gram in row panels gram[i:i+512, i:] too (3xTF32, below) and fills both triangles of a
    float64 one, as the reference does. Read the result through its upper triangle (PCAWhitening does).
    batch: (B, D) float32/float16/bfloat16/float64; shift, sum: (D,) float64;
    gram: (D, D) float64, or float32 for a float32/float16/bfloat16 batch (then the GEMM accumulates into it
    in place, beta = 1, with no pass over a temporary: PCAWhitening keeps such a float32 Gram and adds it into
    its float64 one every `flush_rows` rows); nonfinite_rows: int64 with one element; all on one device. B = 0
    changes nothing. GEMM types: float64 for float64 batches, float32 otherwise on the CPU; on CUDA
    float16/bfloat16 batches multiply in their own dtype on the tensor cores (float32 products); float32
    batches into a float32 gram as three TF32 GEMMs of their split hi + lo parts (float32 accuracy at
    tensor-core rate, whatever torch's TF32 flag; PYDC_PCA_CUDA_GRAM=fp32 turns it off), into a float64
    gram at torch's float32 matmul precision (TF32 after `torch.set_float32_matmul_precision("high")`). Chunks of
    at most 2^23 values and 4096 rows (CPU) / 2^26 values and 16384 rows (CUDA) are centred and multiplied at
    a time (float32 sums over longer runs of rows drift). Why this is robust: with `shift` near the data's
    mean (PCAWhitening uses its first batch's mean) every product is of centred, well-scaled values, so a
    large common offset costs no precision, and the totals live in float64.

pca_transform(x, mean, projection, norm_eps=1e-10) -> (out, nonfinite_rows):
    y = (x - mean) @ projection^T, out = y / (||y||_2 + norm_eps) per row, float32, shape (N, K), and
    nonfinite_rows = the number of rows of x holding NaN/Inf (int64, 0-d); those rows are centred to zero, so
    their output rows are 0. projection: (K, D) float32 or float64, which sets the precision of the product;
    mean: (D,) float64. Whitening scales are folded into `projection` by the caller. The rows are processed in
    the chunks above, so the only full-size tensor written is the (N, K) output. norm_eps = 1e-10 is
    MMSelfSup's guard on the row norm.
"""

from __future__ import annotations

import os
import warnings

import torch

from pydc.ops._registry import HAS_OPS, warn_fallback
from pydc.ops.cpu_gemm import choice, ensure_cpu_gemm

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NORM_EPS = 1e-10
_FALLBACK_CHUNK_ROWS = 65536
_cpu_syrk_tried = False
SYRK_ENV_VAR = "PYDC_CPU_SYRK"
SYRK_CHOICES = ("auto", "pydc", "scipy", "mkl", "panels")
# auto's measurement: the float32 Gram of one block of (rows, features), fastest of this many runs of each,
# the candidates in turn (~0.2 s in all). With 3 rounds, one measurement on a VM slowed ~4x for its duration
# ranked pydc's syrk (42 ms) ahead of MKL's (71 ms), which had taken 9 ms against pydc's 11 ms an hour before.
SYRK_MEASURE_SHAPE = (1024, 1024)
SYRK_MEASURE_ROUNDS = 5
SYRK_MARGIN = 0.95  # auto keeps the faster BLAS syrk unless pydc's takes less than this fraction of its time
# what the report says of a syrk that is not there
_SYRK_MISSING = {"scipy": "not importable", "mkl": "not in torch's libraries"}
_syrk_report: dict = {}


def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def check_features(op: str, name: str, x) -> None:
    """A 2-D (rows, features) tensor of a supported float dtype, else a TypeError/ValueError naming `op`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{op}: expected {name} to be a 2-D (rows, features) tensor, got a {_describe(x)}")
    if x.dtype not in FEATURE_DTYPES:
        raise ValueError(f"{op}: expected {name} of dtype float32, float16, bfloat16 or float64, "
                         f"got {_describe(x)}")
    if x.shape[1] == 0:
        raise ValueError(f"{op}: expected {name} with at least one feature column, got {_describe(x)}")


def _check_vector(op: str, name: str, v: torch.Tensor, x: torch.Tensor) -> None:
    if v.dtype != torch.float64 or v.dim() != 1 or v.shape[0] != x.shape[1]:
        raise ValueError(f"{op}: expected {name} to be a float64 tensor of shape ({x.shape[1]},), "
                         f"got {_describe(v)}")
    if v.device != x.device:
        raise ValueError(f"{op}: expected {name} on {x.device} like the features, got {v.device}")


def _check_accumulate(batch, shift, sum, gram, nonfinite_rows) -> None:
    op = "pca_accumulate"
    check_features(op, "batch", batch)
    _check_vector(op, "shift", shift, batch)
    _check_vector(op, "sum", sum, batch)
    d = batch.shape[1]
    gram_dtypes = (torch.float64,) if batch.dtype == torch.float64 else (torch.float64, torch.float32)
    if gram.dtype not in gram_dtypes or tuple(gram.shape) != (d, d) or gram.device != batch.device:
        raise ValueError(f"{op}: expected gram to be a float64 (or, for a {batch.dtype} batch, float32) ({d}, {d}) "
                         f"tensor on {batch.device}, got {_describe(gram)}")
    if not sum.is_contiguous():
        raise ValueError(f"{op}: expected a contiguous sum, got strides {sum.stride()}")
    counter = nonfinite_rows
    if counter.dtype != torch.int64 or counter.numel() != 1 or counter.device != batch.device:
        raise ValueError(
            f"{op}: expected nonfinite_rows to be an int64 tensor with one element on {batch.device}, "
            f"got {_describe(nonfinite_rows)}"
        )


def _check_transform(x, mean, projection, norm_eps) -> None:
    op = "pca_transform"
    check_features(op, "x", x)
    _check_vector(op, "mean", mean, x)
    projection_dtypes = (torch.float32, torch.float64)
    if projection.dim() != 2 or projection.shape[1] != x.shape[1] or projection.dtype not in projection_dtypes:
        raise ValueError(
            f"{op}: expected projection to be a float32 or float64 tensor of shape (n_components, {x.shape[1]}), "
            f"got {_describe(projection)}"
        )
    if projection.device != x.device:
        raise ValueError(f"{op}: expected projection on {x.device} like x, got {projection.device}")
    if norm_eps < 0:
        raise ValueError(f"{op}: expected norm_eps >= 0, got {norm_eps}")


def _centre_finite_rows(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    centred = x.to(torch.float64) - shift
    finite = torch.isfinite(centred).all(dim=1)
    return torch.where(finite[:, None], centred, 0.0), (~finite).sum()


def pca_accumulate_reference(batch, shift, sum, gram, nonfinite_rows) -> None:
    """The documented update in float64 torch ops (updates sum, gram and nonfinite_rows in place)."""
    _check_accumulate(batch, shift, sum, gram, nonfinite_rows)
    centred, bad_rows = _centre_finite_rows(batch, shift)
    sum += centred.sum(dim=0)
    gram += (centred.T @ centred).to(gram.dtype)
    nonfinite_rows += bad_rows.view_as(nonfinite_rows)


def pca_transform_reference(x, mean, projection, norm_eps: float = NORM_EPS):
    """The documented transform in float64 torch ops: centre, project, L2-normalize rows; float32 output."""
    _check_transform(x, mean, projection, norm_eps)
    centred, bad_rows = _centre_finite_rows(x, mean)
    projected = centred @ projection.to(torch.float64).T
    out = projected / (projected.norm(dim=1, keepdim=True) + norm_eps)
    return out.to(torch.float32), bad_rows


def syrk_requested(value: str | None = None) -> str:
    """The validated choice of the CPU Gram: `value`, or PYDC_CPU_SYRK (default "auto"; "1" means auto and "0"
    panels, as before pydc's own syrk); ValueError for anything else."""
    source = "use_cpu_syrk" if value is not None else SYRK_ENV_VAR
    raw = os.environ.get(SYRK_ENV_VAR, "auto") if value is None else value
    return choice(raw, SYRK_CHOICES, source, "the CPU PCA Gram", aliases={"1": "auto", "0": "panels"})


def use_cpu_syrk(enabled: bool | str = True) -> bool:
    """Chooses how the CPU pca_accumulate kernel computes its Gram, and returns whether a syrk is in use
    afterwards (False without the compiled ops). enabled: "auto" (True), "pydc", "scipy", "mkl" or "panels"
    (False).

    GEMM panels over the upper triangle do ~56% of a full GEMM's flops at a lower rate; a syrk does 50% at
    full rate. Three float32 syrks are candidates: scipy's BLAS ssyrk (scipy.linalg.cython_blas, OpenBLAS),
    MKL's (mkl_blas_ssyrk in torch's libraries: torch's BLAS exports no ssyrk of its own) and pydc's own (the
    tiles of its k-means GEMM, cpu_kernels' syrk_upper_rows). "auto" times each that is there on one
    SYRK_MEASURE_SHAPE block and keeps the faster BLAS one unless pydc's takes less than SYRK_MARGIN of its
    time (pydc's when neither BLAS is there). Measured, one 4096 x 2048 float32 chunk on 2 threads: on AMD
    EPYC Zen 4, pydc's 88-95 ms against OpenBLAS's 105-111 ms at AVX-512, 88 against 97-107 ms capped at AVX2
    (its Haswell kernel); on an Intel Xeon family 6 model 207 (AVX-512), MKL's 66 ms against pydc's 95 ms,
    capped at AVX2 151 against 172 ms. float64 grams (float64 batches) use scipy's dsyrk or the panels. All
    give the same upper triangle up to float32 summation order. pca_accumulate calls this once, on its first
    CPU batch, with PYDC_CPU_SYRK (default auto). scipy's BLAS runs on its own thread pool
    (OPENBLAS_NUM_THREADS, or threadpoolctl), pydc's and MKL's on torch's.
    """
    global _cpu_syrk_tried, _syrk_report
    _cpu_syrk_tried = True
    want = syrk_requested({True: "auto", False: "panels"}.get(enabled, enabled))
    if not HAS_OPS:
        _syrk_report = {"gram": None, "requested": want, "reason": "compiled ops not loaded"}
        return False
    from pydc import _C

    ssyrk = dsyrk = None
    if want != "panels":
        try:
            from scipy.linalg.cython_blas import __pyx_capi__ as blas
        except ImportError:
            blas = {}
        ssyrk, dsyrk = blas.get("ssyrk"), blas.get("dsyrk")
    try:
        _C.set_cpu_syrk(ssyrk, dsyrk)
    except (TypeError, ValueError) as error:  # a scipy whose capsules do not look like ?syrk: no BLAS syrk
        _C.set_cpu_syrk(None, None)
        ssyrk = None
        instead = "GEMM panels" if want == "scipy" else "another syrk or GEMM panels"
        warnings.warn(f"pydc.ops.pca: not using scipy's BLAS syrk for the CPU Gram ({error}); "
                      f"{instead} instead", RuntimeWarning, stacklevel=2)
    missing = {"scipy": ssyrk is None, "mkl": not _C.has_mkl_syrk()}
    report = {"requested": want}
    report.update({name: _SYRK_MISSING[name] for name, absent in missing.items()
                   if absent and want in ("auto", name)})
    if want == "auto":
        scipy_s, pydc_s, mkl_s = _C.time_cpu_syrks(*SYRK_MEASURE_SHAPE, SYRK_MEASURE_ROUNDS)
        blas_times = {name: s for name, s in (("scipy", scipy_s), ("mkl", mkl_s)) if not missing[name]}
        fastest = min(blas_times, key=blas_times.get, default=None)
        chosen = fastest if fastest is not None and pydc_s >= SYRK_MARGIN * blas_times[fastest] else "pydc"
        report.update({f"{name}_s": s for name, s in blas_times.items()}, pydc_s=pydc_s,
                      shape=list(SYRK_MEASURE_SHAPE))
    elif want in missing and missing[want]:
        chosen = "panels"
        _C.set_cpu_syrk(None, dsyrk)  # else the kernel would take scipy's ssyrk, set above, for the panels
    else:
        chosen = want
    _C.set_cpu_float_syrk({"pydc": "pydc", "mkl": "mkl"}.get(chosen, "blas"))
    _syrk_report = {"gram": chosen, **report}
    return bool(_C.has_cpu_syrk())


def ensure_cpu_syrk() -> dict:
    """Chooses the CPU Gram from PYDC_CPU_SYRK if this process has not yet (use_cpu_syrk); returns
    cpu_syrk_report(). ValueError for a bad PYDC_CPU_SYRK."""
    if not _cpu_syrk_tried:
        use_cpu_syrk(syrk_requested())
    return cpu_syrk_report()


def cpu_syrk_report() -> dict:
    """How the CPU float32 Gram is computed, for pydc.info and benchmark records: {"gram": "pydc" | "scipy" |
    "mkl" | "panels" | None (not yet chosen), "requested": ..., and with auto the measured times}."""
    return {"gram": None, **_syrk_report}


def pca_accumulate(batch, shift, sum, gram, nonfinite_rows) -> None:
    """Adds the centred moments of `batch` into (sum, gram); see the module docstring."""
    _check_accumulate(batch, shift, sum, gram, nonfinite_rows)
    if batch.device.type == "cpu":
        ensure_cpu_syrk()
    if not HAS_OPS:
        warn_fallback("pca_accumulate")
        for chunk in batch.split(_FALLBACK_CHUNK_ROWS):
            pca_accumulate_reference(chunk, shift, sum, gram, nonfinite_rows)
        return
    torch.ops.pydc.pca_accumulate(batch, shift, sum, gram, nonfinite_rows)


def pca_transform(x, mean, projection, norm_eps: float = NORM_EPS):
    """(L2-normalized (x - mean) @ projection^T as float32, count of rows with NaN/Inf); see the docstring."""
    _check_transform(x, mean, projection, norm_eps)
    if not HAS_OPS:
        warn_fallback("pca_transform")
        chunks = x.split(_FALLBACK_CHUNK_ROWS)
        parts = [pca_transform_reference(chunk, mean, projection, norm_eps) for chunk in chunks]
        if not parts:
            empty = x.new_empty((0, projection.shape[0]), dtype=torch.float32)
            return empty, torch.zeros((), dtype=torch.int64, device=x.device)
        return torch.cat([out for out, _ in parts]), torch.stack([bad for _, bad in parts]).sum()
    if x.device.type == "cpu":
        ensure_cpu_gemm()  # the float32 projection runs on the k-means GEMM (pydc.ops.cpu_gemm)
    return torch.ops.pydc.pca_transform(x, mean, projection, norm_eps)


if HAS_OPS:

    @torch.library.register_fake("pydc::pca_accumulate")
    def _pca_accumulate_fake(batch, shift, sum, gram, nonfinite_rows):
        torch._check(batch.dim() == 2, lambda: f"pca_accumulate: expected a 2-D batch, got {batch.dim()}-D")
        torch._check(shift.shape == sum.shape == (batch.shape[1],),
                     lambda: "pca_accumulate: shift and sum must be (D,)")
        torch._check(gram.shape == (batch.shape[1], batch.shape[1]), lambda: "pca_accumulate: gram must be (D, D)")
        return None

    @torch.library.register_fake("pydc::pca_transform")
    def _pca_transform_fake(x, mean, projection, norm_eps=NORM_EPS):
        torch._check(x.dim() == 2 and projection.dim() == 2, lambda: "pca_transform: expected 2-D x and projection")
        torch._check(projection.shape[1] == x.shape[1], lambda: "pca_transform: projection must be (K, D)")
        out = x.new_empty((x.shape[0], projection.shape[0]), dtype=torch.float32)
        return out, x.new_empty((), dtype=torch.int64)
