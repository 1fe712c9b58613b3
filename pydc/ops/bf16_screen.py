"""Whether pydc's CPU k-means screens the centroids with a bfloat16 GEMM (torch.ops.pydc.kmeans_assign_bf16)
in the passes that would otherwise be a plain float32 kmeans_assign.

kmeans_assign_bf16 returns kmeans_assign's labels exactly: the bfloat16 scores only rank the centroids, every
row's candidates within a measured error bound of its best are settled in float64 (the bound and its proof are
in csrc/ops/cpu/kmeans_bf16_kernel.cpp). It pays only where MKL's bfloat16 GEMM runs on bfloat16 hardware
(AMX or AVX512-BF16: 5x the float32 GEMM's rate on an Intel Xeon with AMX, one thread); elsewhere MKL emulates
it, slower than float32. On CPUs with AVX512-BF16 and no AMX (AMD Zen 4) MKL's took longer than the float32
assignment too, so pydc brings its own AVX512-BF16 kernel (csrc/ops/cpu/gemm_bf16_avx512.cpp). Which GEMM runs:

    PYDC_BF16_GEMM=auto    (default) pydc's at the avx512 level on a CPU with AVX512-BF16 and without AMX-BF16,
                           MKL's elsewhere
    PYDC_BF16_GEMM=mkl     MKL's (a RuntimeError where torch has none)
    PYDC_BF16_GEMM=pydc    pydc's (a RuntimeError on a CPU without AVX512-BF16)

and whether the screen runs at all is chosen once per process and GEMM:

    PYDC_KMEANS_BF16=auto  (default) only at the avx512 ISA level (pydc.ops.cpu_capability: capped below it, as
                           PYDC_CPU_CAPABILITY=avx2 does, the float32 path runs); there, on a CPU with AMX-BF16
                           (the amx_bf16 flag of /proc/cpuinfo: MKL runs the GEMM on AMX tiles), always; on
                           others (AVX512-BF16 alone, or MKL's emulation) only when one assignment of
                           MEASURE_SHAPE points x centroids x features, timed against kmeans_assign (alternating,
                           fastest of MEASURE_ROUNDS each, ~0.3 s once), takes less than MARGIN of its time
    PYDC_KMEANS_BF16=on    always (a RuntimeError where neither GEMM can run): tests
    PYDC_KMEANS_BF16=off   never

The k-means labels do not depend on the choice.
"""

from __future__ import annotations

import os
import time

import torch

from pydc.ops._registry import HAS_OPS

ENV_VAR = "PYDC_KMEANS_BF16"
CHOICES = ("auto", "on", "off")
GEMM_ENV_VAR = "PYDC_BF16_GEMM"
GEMM_CHOICES = ("auto", "mkl", "pydc")
MEASURE_SHAPE = (8192, 1024, 256)
MEASURE_ROUNDS = 5
MARGIN = 0.9  # auto screens only when that costs less than this fraction of the float32 assignment

_chosen: dict[str, bool] = {}  # per bfloat16 GEMM: the choice of auto (only ever made at the avx512 level)
_report: dict = {}


def requested() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(CHOICES)}, got {value!r}")
    return value


def requested_gemm() -> str:
    value = os.environ.get(GEMM_ENV_VAR, "auto").strip().lower() or "auto"
    if value not in GEMM_CHOICES:
        raise ValueError(f"{GEMM_ENV_VAR} must be one of {', '.join(GEMM_CHOICES)}, got {value!r}")
    return value


def apply_gemm_setting() -> str:
    """Selects the bfloat16 GEMM PYDC_BF16_GEMM asks for; returns the one kmeans_assign_bf16 uses now ("mkl",
    "pydc", or "none" where neither can run). ValueError for an unknown setting, RuntimeError for a GEMM that
    cannot run here."""
    if not HAS_OPS:
        return "none"
    from pydc import _C

    _C.set_bf16_gemm(requested_gemm())
    return _C.bf16_gemm()


def available() -> bool:
    """Whether kmeans_assign_bf16 can run here: compiled ops with MKL's bfloat16 GEMM found in torch's libraries,
    or a CPU with AVX512-BF16 for pydc's own."""
    return apply_gemm_setting() != "none"


def pydc_bf16_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T in float32 by pydc's own bfloat16 GEMM, one thread (the kernel kmeans_assign_bf16 runs on CPUs
    with AVX512-BF16 and no AMX): a (m, d) and b (n, d) CPU bfloat16. RuntimeError on a CPU without AVX512-BF16."""
    from pydc import _C

    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16 or a.device.type != "cpu" or b.device.type != "cpu":
        raise ValueError(f"pydc_bf16_gemm: expected CPU bfloat16 tensors, got {a.dtype} on {a.device} and "
                         f"{b.dtype} on {b.device}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"pydc_bf16_gemm: expected a (m, d) and b (n, d), d > 0, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float32)
    _C.pydc_bf16_gemm(a.data_ptr(), b.data_ptr(), out.data_ptr(), a.shape[0], b.shape[0], a.shape[1])
    return out


def measure() -> tuple[float, float]:
    """(kmeans_assign's, kmeans_assign_bf16's) fastest seconds on MEASURE_SHAPE, alternating."""
    n, k, d = MEASURE_SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)
    x_bf16, norms = x.to(torch.bfloat16), (x * x).sum(1)
    centroids = x[:k] * 0.25  # the norm of k-means centroids of such points (k = 1000: 0.24-0.26)
    plain = lambda: torch.ops.pydc.kmeans_assign(x, centroids, norms, True)  # noqa: E731
    screened = lambda: torch.ops.pydc.kmeans_assign_bf16(x, x_bf16, centroids, norms)  # noqa: E731
    best = [float("inf"), float("inf")]
    for round_ in range(MEASURE_ROUNDS + 1):  # the first round untimed
        for side, fn in enumerate((plain, screened)):
            start = time.perf_counter()
            fn()
            if round_ > 0:
                best[side] = min(best[side], time.perf_counter() - start)
    return best[0], best[1]


def use_bf16_screen() -> bool:
    """Whether the CPU k-means passes that score every pair without keeping the products run
    kmeans_assign_bf16 (PYDC_KMEANS_BF16, module docstring). ValueError for an unknown setting, RuntimeError
    for "on" where it cannot run."""
    global _report
    want = requested()
    if want == "off":
        return False
    if want == "on":
        if not available():
            raise RuntimeError(f"{ENV_VAR}=on: kmeans_assign_bf16 needs the compiled ops and MKL's bfloat16 GEMM "
                               "(torch built with MKL) or a CPU with AVX512-BF16; set it to auto or off")
        return True
    from pydc.ops.cpu_capability import cpu_capability

    if cpu_capability() != "avx512":
        return False
    gemm = apply_gemm_setting()
    if gemm == "none":
        return False
    if gemm not in _chosen:
        if "amx_bf16" in cpu_flags() and gemm == "mkl":
            _chosen[gemm] = True
            _report = {"chosen": True, "reason": "amx_bf16", "gemm": gemm}
        else:
            plain_s, screened_s = measure()
            _chosen[gemm] = screened_s < MARGIN * plain_s
            _report = {"plain_s": plain_s, "bf16_s": screened_s, "shape": list(MEASURE_SHAPE), "gemm": gemm,
                       "chosen": _chosen[gemm]}
    return _chosen[gemm]


# The screening ops refuse non-finite points or centroids and norms whose float32 scores could overflow
# (||x|| ||c|| or ||c||^2 at 1e37 and above, kmeans_bf16_kernel.cpp): a pass whose inputs are not well inside
# (finite, both products below SAFE_SCORE) runs the float32 op instead, with the same labels.
SAFE_SCORE = 1e30


class ScreenedPoints:
    """One k-means run's points for its full passes: asks use_bf16_screen() once, keeps x rounded to bfloat16
    when the run screens, and assigns with kmeans_assign_bf16 then (kmeans_assign otherwise, and for passes
    outside the screen's domain, in_domain; the same labels). Shared by the assigners a run hands over
    between (kmeans_bounded.py, kmeans_delta.py)."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self._screen: bool | None = None
        self._bf16: torch.Tensor | None = None
        self._max_sq_norm: float | None = None  # the points' largest squared norm (+inf unless all finite)

    def screens(self) -> bool:
        """Whether the run screens (use_bf16_screen(), asked on first use)."""
        if self._screen is None:
            self._screen = use_bf16_screen()
        return self._screen

    def bf16(self) -> torch.Tensor | None:
        """x in bfloat16 when the run screens (made on first use), else None."""
        if not self.screens():
            return None
        if self._bf16 is None:
            self._bf16 = self.x.to(torch.bfloat16)
        return self._bf16

    def in_domain(self, centroids: torch.Tensor, x_sq_norms: torch.Tensor) -> bool:
        """Whether a screened pass can take these centroids: finite points and centroids whose scores stay
        far from float32's overflow (SAFE_SCORE). Data with NaN or huge rows, and the NaN centroids of
        clusters that hold such rows, make every pass plain float32. x_sq_norms: the points' squared norms (a
        row with a NaN or infinite feature has a NaN or infinite one), read once."""
        if self._max_sq_norm is None:
            finite = bool(torch.isfinite(x_sq_norms).all()) and x_sq_norms.numel() > 0
            self._max_sq_norm = float(x_sq_norms.double().max()) if finite else float("inf")
        if not torch.isfinite(centroids).all():
            return False
        max_c = float(centroids.double().norm(dim=1).max())
        return self._max_sq_norm ** 0.5 * max_c < SAFE_SCORE and max_c * max_c < SAFE_SCORE

    def bf16_for(self, centroids: torch.Tensor, x_sq_norms: torch.Tensor) -> torch.Tensor | None:
        """x in bfloat16 for a screened pass over these centroids, None for a float32 one."""
        return self.bf16() if self.screens() and self.in_domain(centroids, x_sq_norms) else None

    def assign(self, centroids: torch.Tensor, x_sq_norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, distances) of kmeans_assign, screened where the run screens and the pass is in_domain."""
        x_bf16 = self.bf16_for(centroids, x_sq_norms)
        if x_bf16 is not None:
            return torch.ops.pydc.kmeans_assign_bf16(self.x, x_bf16, centroids, x_sq_norms)
        return torch.ops.pydc.kmeans_assign(self.x, centroids, x_sq_norms, True)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (/proc/cpuinfo), empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_screen_report() -> dict:
    """auto's last choice (empty before one): the rule or the two measured times, for benchmark records."""
    return dict(_report)
