"""Whether pydc's CPU k-means screens the centroids with a bfloat16 GEMM (torch.ops.pydc.kmeans_assign_bf16)
in the passes that would otherwise be a plain float32 kmeans_assign.

kmeans_assign_bf16 returns kmeans_assign's labels exactly: the bfloat16 scores only rank the centroids, every
row's candidates within a measured error bound of its best are settled in float64 (the bound and its proof are
in csrc/ops/cpu/kmeans_bf16_kernel.cpp). It pays only where MKL's bfloat16 GEMM runs on bfloat16 hardware
(AMX or AVX512-BF16: 5x the float32 GEMM's rate on an Intel Xeon with AMX, one thread); elsewhere MKL emulates
it, slower than float32. So the choice is made once per process:

    PYDC_KMEANS_BF16=auto  (default) only at the avx512 ISA level (pydc.ops.cpu_capability: capped below it, as
                           PYDC_CPU_CAPABILITY=avx2 does, the float32 path runs); there, on a CPU with AMX-BF16
                           (the amx_bf16 flag of /proc/cpuinfo: MKL runs the GEMM on AMX tiles), always; on
                           others (AVX512-BF16 alone, or MKL's emulation) only when one assignment of
                           MEASURE_SHAPE points x centroids x features, timed against kmeans_assign (alternating,
                           fastest of MEASURE_ROUNDS each, ~0.3 s once), takes less than MARGIN of its time
    PYDC_KMEANS_BF16=on    always (a RuntimeError where MKL's bfloat16 GEMM is missing): tests
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
MEASURE_SHAPE = (8192, 1024, 256)
MEASURE_ROUNDS = 5
MARGIN = 0.9  # auto screens only when that costs less than this fraction of the float32 assignment

_chosen: dict[str, bool] = {}  # per ISA level: the measured choice of auto
_report: dict = {}


def requested() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(CHOICES)}, got {value!r}")
    return value


def available() -> bool:
    """Whether kmeans_assign_bf16 can run here: compiled ops with MKL's bfloat16 GEMM found in torch's libraries."""
    if not HAS_OPS:
        return False
    from pydc import _C

    return bool(_C.has_bf16_gemm())


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
                               "(torch built with MKL); set it to auto or off")
        return True
    from pydc.ops.cpu_capability import cpu_capability

    level = cpu_capability()
    if level != "avx512" or not available():
        return False
    if level not in _chosen:
        if "amx_bf16" in cpu_flags():
            _chosen[level] = True
            _report = {"chosen": True, "reason": "amx_bf16"}
        else:
            plain_s, screened_s = measure()
            _chosen[level] = screened_s < MARGIN * plain_s
            _report = {"plain_s": plain_s, "bf16_s": screened_s, "shape": list(MEASURE_SHAPE),
                       "chosen": _chosen[level]}
    return _chosen[level]


class ScreenedPoints:
    """One k-means run's points for its full passes: asks use_bf16_screen() once, keeps x rounded to bfloat16
    when the run screens, and assigns with kmeans_assign_bf16 then (kmeans_assign otherwise; the same labels).
    Shared by the assigners a run hands over between (kmeans_bounded.py, kmeans_delta.py)."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self._screen: bool | None = None
        self._bf16: torch.Tensor | None = None

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

    def assign(self, centroids: torch.Tensor, x_sq_norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, distances) of kmeans_assign, screened where the run screens."""
        x_bf16 = self.bf16()
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
