"""Run-time ISA dispatch of the CPU kernels: the level picked matches the CPU, PYDC_CPU_CAPABILITY caps it,
and every level the machine supports computes what the references compute, bitwise the same as the others."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pydc.ops import kmeans_assign_reference, kmeans_update_reference, pca_transform_reference
from pydc.ops import pca as pca_ops
from pydc.ops import sobel_normalize_reference
from pydc.ops.cpu_capability import (LEVELS, cpu_capability, cpu_capability_level, cpu_supported_capability,
                                     cpu_vector_width, set_cpu_capability, supported_levels)
from pydc.ops.odc import odc_class_sums_reference, odc_update_samples_reference

ROOT = Path(__file__).resolve().parents[1]


def level_from_cpuinfo() -> str:
    """The level /proc/cpuinfo's flags allow, by the rule the library documents."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "default"


def capability_in_fresh_process(cap: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYDC_CPU_CAPABILITY", None)
    if cap is not None:
        env["PYDC_CPU_CAPABILITY"] = cap
    code = "import pydc.ops.cpu_capability as c; print(c.cpu_capability(), c.cpu_supported_capability())"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=True)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or os.uname().machine != "x86_64", reason="x86-64 Linux")
def test_supported_level_matches_the_cpu_flags():
    assert cpu_supported_capability() == level_from_cpuinfo()


@pytest.mark.slow
def test_environment_variable_caps_the_level():
    supported = cpu_supported_capability()
    result = capability_in_fresh_process(None)
    assert result.stdout.split() == [supported, supported]
    for cap in LEVELS:
        expected = LEVELS[min(LEVELS.index(cap), LEVELS.index(supported))]  # a cap, never a raise
        assert capability_in_fresh_process(cap).stdout.split() == [expected, supported]
    bogus = capability_in_fresh_process("sse9")
    assert bogus.stdout.split() == [supported, supported]
    assert "PYDC_CPU_CAPABILITY=sse9" in bogus.stderr


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64: the other machines build the baseline only")
def test_each_level_runs_loops_of_its_register_width():
    """Each level's unit is compiled for its registers (g++ defines no __AVX2__ / __AVX512F__ under `#pragma GCC
    target`: keyed on those, every level ran the baseline's 4-float vectors and no FMA)."""
    widths = {"default": 4, "avx2": 8, "avx512": 16}
    for level in supported_levels():
        with cpu_capability_level(level):
            assert cpu_vector_width() == widths[level]


def test_setter_changes_level_and_rejects_unsupported():
    start = cpu_capability()
    for level in supported_levels():
        with cpu_capability_level(level):
            assert cpu_capability() == level
        assert cpu_capability() == start
    with pytest.raises(ValueError, match="expected one of"):
        set_cpu_capability("avx1024")
    unsupported = [level for level in LEVELS if level not in supported_levels()]
    for level in unsupported:
        with pytest.raises(RuntimeError, match="supports up to"):
            set_cpu_capability(level)
    assert cpu_capability() == start


def run_every_op(seed: int) -> dict[str, torch.Tensor]:
    """Outputs of every dispatched CPU loop on fixed random inputs, checked against the references."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    # Sobel, uint8 -> float32, both layouts (W = 37: vector tails)
    images = torch.randint(0, 256, (2, 3, 21, 37), dtype=torch.uint8, generator=generator)
    for name, batch in (("sobel", images), ("sobel_nhwc", images.contiguous(memory_format=torch.channels_last))):
        result = torch.ops.pydc.sobel_normalize(batch, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], None)
        torch.testing.assert_close(result, sobel_normalize_reference(batch), rtol=1e-5, atol=1e-4)
        out[name] = result
    # PCA: centring (accumulate) and normalisation (transform), D = 70 (vector tails)
    x = torch.randn(300, 70, generator=generator) * 3 + 5
    x[7, 3] = float("nan")
    shift = x.nanmean(0).double()
    total, gram, bad = torch.zeros(70, dtype=torch.float64), torch.zeros(70, 70), torch.zeros(1, dtype=torch.int64)
    torch.ops.pydc.pca_accumulate(x, shift, total, gram, bad)
    ref_total, ref_gram, ref_bad = torch.zeros_like(total), torch.zeros(70, 70, dtype=torch.float64), torch.zeros_like(bad)
    from pydc.ops.pca import pca_accumulate_reference
    pca_accumulate_reference(x, shift, ref_total, ref_gram, ref_bad)
    assert int(bad) == int(ref_bad) == 1
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gram.triu().double(), ref_gram.triu(), rtol=1e-4, atol=1e-2)
    projection = torch.randn(19, 70, generator=generator)
    y, y_bad = torch.ops.pydc.pca_transform(x, shift, projection, 1e-10)
    ref_y, _ = pca_transform_reference(x, shift, projection)
    torch.testing.assert_close(y, ref_y, rtol=1e-4, atol=1e-5)
    out.update(pca_total=total, pca_gram=gram.triu(), pca_y=y)
    # k-means assignment (k = 45: lanes + tail) and update
    points = torch.randn(500, 33, generator=generator)
    centroids = torch.randn(45, 33, generator=generator)
    points[10] = centroids[3]  # a point on a centroid
    points[11] = points[12]    # duplicates
    labels, distances = torch.ops.pydc.kmeans_assign(points, centroids, None, True)
    exact = torch.cdist(points.double(), centroids.double()).pow(2)
    assert torch.equal(labels, exact.argmin(1))
    torch.testing.assert_close(distances, kmeans_assign_reference(points, centroids)[1], rtol=1e-4, atol=1e-4)
    sums, counts = torch.ops.pydc.kmeans_update(points, labels, 45, True)
    ref_sums, ref_counts = kmeans_update_reference(points, labels, 45)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-6, atol=1e-5)
    assert torch.equal(counts, ref_counts)
    out.update(kmeans_labels=labels, kmeans_distances=distances, kmeans_sums=sums)
    # ODC: sample update (GEMM + per-row max) and class sums (fixed-point adds)
    bank = torch.nn.functional.normalize(torch.randn(64, 24, generator=generator, dtype=torch.float64), dim=1)
    label_bank = torch.randint(0, 9, (64,), generator=generator)
    odc_centroids = torch.nn.functional.normalize(torch.randn(9, 24, generator=generator, dtype=torch.float64), dim=1)
    state = [bank.clone(), label_bank.clone(), torch.zeros(9, dtype=torch.int64), torch.zeros(9, 24, dtype=torch.int64)]
    torch.ops.pydc.odc_class_sums(state[0], state[1], state[3], state[2])
    ref_state = [t.clone() for t in state]
    ref_counts, ref_sums = torch.zeros(9, dtype=torch.int64), torch.zeros(9, 24, dtype=torch.int64)
    odc_class_sums_reference(bank, label_bank, ref_sums, ref_counts)
    assert torch.equal(state[3], ref_sums) and torch.equal(state[2], ref_counts)
    indices = torch.tensor([3, 5, 3, 60, 1])
    features = torch.randn(5, 24, generator=generator, dtype=torch.float64)
    changes = torch.ops.pydc.odc_update_samples(*state, odc_centroids, indices, features, 0.5)
    ref_changes = odc_update_samples_reference(*ref_state, odc_centroids, indices, features, 0.5)
    assert int(changes) == int(ref_changes)
    torch.testing.assert_close(state[0], ref_state[0], rtol=1e-12, atol=1e-14)  # bank: float64 norms' order
    assert torch.equal(state[1], ref_state[1]) and torch.equal(state[2], ref_state[2])
    assert int((state[3] - ref_state[3]).abs().max()) <= 4  # fixed-point units (2^-57 here) of those rows
    out.update(odc_bank=state[0], odc_labels=state[1], odc_sums=state[3])
    return out


@pytest.fixture
def gemm_choice():
    """The test may select a CPU k-means GEMM (pydc.ops.cpu_gemm.use_cpu_gemm) and PCA Gram (use_cpu_syrk);
    the process's GEMM choice comes back, and the Gram is auto's again."""
    from pydc.ops import cpu_gemm

    chosen, report = cpu_gemm._chosen, dict(cpu_gemm._report)
    yield
    cpu_gemm.use_cpu_gemm(chosen or "torch")
    cpu_gemm._chosen, cpu_gemm._report = chosen, report
    pca_ops.use_cpu_syrk("auto")


def baseline_and_level(level: str, gemm: str, seed: int) -> tuple[dict, dict]:
    """run_every_op at the baseline level and at `level` (skipped where the CPU lacks it), with `gemm`
    selected for k-means and the matching PCA Gram: pydc's syrk with pydc's GEMM (the same tiles), else
    scipy's BLAS syrk or torch's GEMM panels (which pydc's level does not change)."""
    if level not in supported_levels():
        pytest.skip(f"this CPU supports up to {cpu_supported_capability()}")
    from pydc.ops import cpu_gemm

    cpu_gemm.use_cpu_gemm(gemm)
    if gemm == "pydc":
        pca_ops.use_cpu_syrk("pydc")
    elif not pca_ops.use_cpu_syrk("scipy") or pca_ops.cpu_syrk_report()["gram"] != "scipy":
        pca_ops.use_cpu_syrk("panels")
    with cpu_capability_level("default"):
        baseline = run_every_op(seed=seed)
    with cpu_capability_level(level):
        assert cpu_capability() == level
        return baseline, run_every_op(seed=seed)


@pytest.mark.parametrize("level", LEVELS)
def test_every_level_matches_references_and_the_baseline_bitwise(level, gemm_choice):
    """kmeans_assign's float32 distances come from the selected GEMM, the PCA Gram from the selected syrk:
    torch's GEMM and scipy's syrk give the same bits at every pydc level, pydc's own use fused multiply-adds
    from avx2 up (like block_scores8), so this holds them to torch's and scipy's."""
    baseline, ours = baseline_and_level(level, "torch", seed=5)
    for name, value in ours.items():
        assert torch.equal(value, baseline[name]), f"{name} differs between {level} and the baseline"


@pytest.mark.parametrize("level", LEVELS)
def test_every_level_matches_the_references_with_pydcs_gemm(level, gemm_choice):
    """With pydc's own GEMM (and syrk) every level still gives the exact labels, and distances and Gram within
    the references' tolerance (run_every_op checks them), and the labels are the baseline's bitwise."""
    baseline, ours = baseline_and_level(level, "pydc", seed=6)
    assert torch.equal(ours["kmeans_labels"], baseline["kmeans_labels"])
