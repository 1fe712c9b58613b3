"""The run-time choice of the GEMM behind the CPU k-means passes (pydc.ops.cpu_gemm, csrc/ops/cpu/blas_gemm.h):
each one forced gives the exact labels, pydc's own sums every product in float32 at every ISA level, the
environment variable forces a choice and rejects bad values, auto keeps the fastest measured when it is clearly
faster than torch's, and scipy's OpenBLAS is held to one thread during the kernels' per-thread GEMMs and gets
its thread count back after."""

from __future__ import annotations

import math
import os

import pytest
import torch

from pydc import _C
from pydc.cluster import kmeans
from pydc.ops import cpu_gemm, kmeans_assign, kmeans_assign_reference
from pydc.ops.cpu_capability import LEVELS, cpu_capability_level, supported_levels

ASSIGN = torch.ops.pydc.kmeans_assign
BLAS = ("torch", "scipy", "pydc")


@pytest.fixture(autouse=True)
def restore_choice(restore_cpu_gemm):
    """Each test may select a BLAS or set PYDC_CPU_GEMM; the process's earlier environment and then its choice
    (conftest's restore_cpu_gemm) come back afterwards (after the test's own monkeypatch is undone: this fixture
    is set up before it)."""
    environment = os.environ.pop(cpu_gemm.ENV_VAR, None)
    yield
    if environment is not None:
        os.environ[cpu_gemm.ENV_VAR] = environment


def clustered(n: int, k: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn((k, d), generator=generator, dtype=torch.float64) * 3
    members = torch.randint(0, k, (n,), generator=generator)
    x = centres[members] + torch.randn((n, d), generator=generator, dtype=torch.float64)
    return x.float(), x[torch.randperm(n, generator=generator)[:k]].float()


@pytest.mark.parametrize("blas", BLAS)
@pytest.mark.parametrize("size", [(37, 5, 3), (4200, 1100, 16)], ids=["small", "across-blocks"])
def test_each_blas_gives_the_reference_labels(blas, size):
    # 4200 x 1100: two point blocks and a second centroid block of 76 columns in a 1024-wide buffer (ldc > m)
    n, k, d = size
    assert cpu_gemm.use_cpu_gemm(blas) == blas and _C.cpu_gemm() == blas
    x, centroids = clustered(n, k, d, seed=n)
    x[3] = centroids[1]  # a point on a centroid, and a duplicated centroid: exact ties, lowest index wins
    centroids[min(2, k - 1)] = centroids[0]
    labels, distances = ASSIGN(x, centroids, None, True)
    ref_labels, ref_distances = kmeans_assign_reference(x, centroids, compute_dtype=torch.float64)
    assert torch.equal(labels, ref_labels)
    scale = float((x.double() ** 2).sum(1).max() + (centroids.double() ** 2).sum(1).max())
    torch.testing.assert_close(distances, ref_distances, rtol=0, atol=1e-5 * scale)


def test_bounded_kmeans_equals_plain_lloyd_with_either_blas():
    x, init = clustered(5000, 40, 8, seed=5)  # two blocks of the bounded kernel's GEMM
    runs = {}
    for blas in BLAS:
        cpu_gemm.use_cpu_gemm(blas)
        runs[blas] = kmeans(x, 40, niter=8, backend="torch", init_centroids=init)
        assert runs[blas].bounded and runs[blas].cpu_gemm == blas
    cpu_gemm.use_cpu_gemm("torch")
    plain = kmeans(x, 40, niter=8, backend="torch", init_centroids=init, bounded=False)
    for run in runs.values():
        assert torch.equal(run.labels, plain.labels) and torch.equal(run.centroids, plain.centroids)
        torch.testing.assert_close(torch.tensor(run.objective), torch.tensor(plain.objective), rtol=1e-6, atol=0)


@pytest.mark.parametrize("blas", BLAS)
def test_bounded_assignment_op_gives_the_reference_labels(blas):
    # Bounded k-means runs this op's GEMM only in its dense passes, and Lloyd recovers from a wrong pass on
    # separated data: the op itself is checked. 5000 points: two blocks of its GEMM.
    x, centroids = clustered(5000, 40, 8, seed=6)
    cpu_gemm.use_cpu_gemm(blas)
    ids, offsets = torch.arange(40), torch.tensor([0, 15, 40])
    labels = torch.ops.pydc.kmeans_assign_bounds(x, centroids, ids, offsets, (x * x).sum(1))[0]
    assert torch.equal(labels, kmeans_assign_reference(x, centroids, compute_dtype=torch.float64)[0])


def test_environment_variable_forces_the_blas(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "measure", lambda: pytest.fail("a forced BLAS must not be measured"))
    for blas in BLAS:
        monkeypatch.setenv(cpu_gemm.ENV_VAR, f" {blas.upper()} ")
        cpu_gemm._chosen = None  # as in a fresh process
        x, centroids = clustered(50, 4, 3, seed=0)
        kmeans_assign(x, centroids)  # the first CPU call through pydc chooses
        assert _C.cpu_gemm() == blas
        report = cpu_gemm.cpu_gemm_report()
        assert (report["gemm"], report["requested"], report["reason"]) == (blas, blas, "forced")


@pytest.mark.parametrize("value", ["openblas", "", "mkl", "auto,torch"])
def test_bad_environment_value_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(cpu_gemm.ENV_VAR, value)
    cpu_gemm._chosen = None
    x, centroids = clustered(20, 3, 2, seed=0)
    with pytest.raises(ValueError, match=r"PYDC_CPU_GEMM: expected one of auto, torch, scipy, pydc .*got " + repr(value)):
        kmeans_assign(x, centroids)
    with pytest.raises(ValueError, match="use_cpu_gemm: expected one of auto, torch, scipy, pydc"):
        cpu_gemm.use_cpu_gemm("blas")


@pytest.mark.parametrize("times, expected", [
    ((1.0, 2.0, 3.0), "torch"), ((2.0, 1.0, 3.0), "scipy"), ((2.0, 3.0, 1.0), "pydc"), ((1.0, 0.97, 0.98), "torch"),
    ((1.0, math.inf, 0.9), "pydc")], ids=["torch-faster", "scipy-faster", "pydc-faster", "close", "no-scipy"])
def test_auto_keeps_the_fastest_when_clearly_faster_than_torch(monkeypatch, times, expected):
    monkeypatch.setattr(cpu_gemm, "measure", lambda: dict(zip(("torch", "scipy", "pydc"), times)))
    assert cpu_gemm.use_cpu_gemm("auto") == expected and _C.cpu_gemm() == expected
    report = cpu_gemm.cpu_gemm_report()
    assert (report["gemm"], report["torch_s"], report["scipy_s"], report["pydc_s"]) == (expected, *times)


@pytest.mark.parametrize("second, expected", [
    ((2.0, 3.0, 1.0), "pydc"), ((1.0, 3.0, 1.2), "torch"), ((2.0, 1.0, 3.0), "torch")],
    ids=["confirmed", "torch-faster-again", "another-faster-again"])
def test_auto_switches_only_when_a_second_measurement_agrees(monkeypatch, second, expected):
    """A first measurement that puts pydc's GEMM ahead is repeated; auto leaves torch's BLAS only when the
    repeat picks the same GEMM (a noisy VM once picked pydc's, ~10% slower in the runs that followed)."""
    measurements = iter([(2.0, 3.0, 1.0), second])
    calls = []

    def measure():
        calls.append(1)
        return dict(zip(("torch", "scipy", "pydc"), next(measurements)))

    monkeypatch.setattr(cpu_gemm, "measure", measure)
    assert cpu_gemm.use_cpu_gemm("auto") == expected and _C.cpu_gemm() == expected
    report = cpu_gemm.cpu_gemm_report()
    assert len(calls) == 2 and (report["pydc_s"], report["confirm_torch_s"]) == (1.0, second[0])


def test_auto_measures_once_when_torch_wins(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_gemm, "measure",
                        lambda: calls.append(1) or {"torch": 1.0, "scipy": 2.0, "pydc": 0.99})
    assert cpu_gemm.use_cpu_gemm("auto") == "torch" and len(calls) == 1
    assert "confirm_torch_s" not in cpu_gemm.cpu_gemm_report()


def test_auto_measures_every_gemm():
    cpu_gemm.use_cpu_gemm("scipy")  # sets scipy's sgemm
    seconds = cpu_gemm.measure()
    assert set(seconds) == {"torch", "scipy", "pydc"}
    assert all(math.isfinite(t) and t > 0 for t in seconds.values())
    chosen = cpu_gemm.use_cpu_gemm("auto")
    report = cpu_gemm.cpu_gemm_report()
    first = cpu_gemm.pick({name: report[f"{name}_s"] for name in seconds})
    if first != "torch":  # kept only when the second measurement picks it too
        again = cpu_gemm.pick({name: report[f"confirm_{name}_s"] for name in seconds})
        first = first if again == first else "torch"
    assert chosen == first == _C.cpu_gemm()
    with pytest.raises(RuntimeError, match="expects positive rows"):
        _C.time_cpu_gemms(0, 4, 4, 1)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 17, 3), (13, 33, 256), (256, 1000, 255), (6, 64, 40)])
def test_pydc_gemm_sums_every_product_in_float32(level, shape):
    """pydc's own GEMM (every tile height 1-6, partial panels of 16 and 32, odd d, a strided a, b and out)
    against float64 sums: within the float32 dot-product bound gamma_d |a| |b| of every entry."""
    if level not in supported_levels():
        pytest.skip(f"CPU lacks {level}")
    m, n, d = shape
    generator = torch.Generator().manual_seed(m * n + d)
    a_wide = torch.randn(m, d + 3, generator=generator)
    a = a_wide[:, 1:d + 1]  # rows d + 3 apart
    b = torch.randn(n, d + 2, generator=generator)[:, 2:]  # rows d + 2 apart (packed 8 x 8 at a time)
    out_wide = torch.full((m, n + 5), float("nan"))
    out = out_wide[:, :n]
    cpu_gemm.use_cpu_gemm("pydc")
    with cpu_capability_level(level):
        ASSIGN(a.contiguous(), b, None, True)  # through a k-means pass too
        cpu_gemm.gemm_abt(out, a, b)
    exact = a.double() @ b.double().T
    gamma = d * 2.0 ** -24 / (1 - d * 2.0 ** -24)
    allowed = gamma * (a.double().abs() @ b.double().abs().T)
    assert bool(((out.double() - exact).abs() <= allowed).all())
    assert bool(out_wide[:, n:].isnan().all())  # nothing written past n


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 17, 3), (1, 300, 64), (300, 1100, 40), (256, 1000, 255)])
def test_torch_gemm_sums_every_product_in_float32(shape):
    """torch's GEMM as the kernels run it: on MKL's packed form of b where torch has MKL (the x86 wheels) and b
    holds 2^14 floats or more (the last three shapes), with a, b and out rows further apart than their length,
    one row or many, m above and below the 256 rows MKL packed for; within the float32 bound gamma_d |a| |b| of
    every entry, nothing written past n."""
    if torch.backends.mkl.is_available():
        assert _C.has_mkl_packed_sgemm()  # MKL's packed API found in torch's libraries
    m, n, d = shape
    generator = torch.Generator().manual_seed(m + n * d)
    a = torch.randn(m, d + 3, generator=generator)[:, 1:d + 1]
    b = torch.randn(n, d + 2, generator=generator)[:, 2:]
    out_wide = torch.full((m, n + 5), float("nan"))
    out = out_wide[:, :n]
    assert cpu_gemm.use_cpu_gemm("torch") == "torch"
    assert cpu_gemm.cpu_gemm_report()["mkl_packed"] == bool(_C.has_mkl_packed_sgemm())
    cpu_gemm.gemm_abt(out, a, b)
    exact = a.double() @ b.double().T
    gamma = d * 2.0 ** -24 / (1 - d * 2.0 ** -24)
    assert bool(((out.double() - exact).abs() <= gamma * (a.double().abs() @ b.double().abs().T)).all())
    assert bool(out_wide[:, n:].isnan().all())


def test_gemm_abt_refuses_bad_arguments():
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="float32"):
        cpu_gemm.gemm_abt(torch.empty(4, 5), a.double(), b)
    with pytest.raises(ValueError, match=r"out of shape \(4, 5\)"):
        cpu_gemm.gemm_abt(torch.empty(5, 4), a, b)
    with pytest.raises(ValueError, match="unit column stride"):
        cpu_gemm.gemm_abt(torch.empty(4, 5), torch.randn(3, 4).t(), b)
    with pytest.raises(ValueError, match="features"):
        cpu_gemm.gemm_abt(torch.empty(4, 5), a, torch.randn(5, 2))


def test_scipy_forced_without_scipy_is_an_error(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_scipy_sgemm", lambda: None)
    with pytest.raises(RuntimeError, match="PYDC_CPU_GEMM=scipy: scipy.linalg.cython_blas is not importable"):
        cpu_gemm.use_cpu_gemm("scipy")
    monkeypatch.setattr(cpu_gemm, "measure", lambda: {"torch": 1.0, "scipy": math.inf, "pydc": 2.0})
    assert cpu_gemm.use_cpu_gemm("auto") == "torch" and cpu_gemm.cpu_gemm_report()["scipy"] == "not installed"
    with pytest.raises(RuntimeError, match="no run-time sgemm is set"):
        _C.set_cpu_gemm("scipy")


def test_setter_checks_the_capsule():
    from scipy.linalg.cython_blas import __pyx_capi__ as blas

    with pytest.raises(ValueError, match=r"sgemm has signature .*expected .*__pyx_capi__\['sgemm'\]"):
        _C.set_cpu_sgemm(blas["ssyrk"])
    with pytest.raises(ValueError, match="sgemm has signature"):
        _C.set_cpu_sgemm(blas["dgemm"])
    with pytest.raises(TypeError, match="capsule or None"):
        _C.set_cpu_sgemm(3)
    with pytest.raises(ValueError, match="expected 'torch', 'scipy' or 'pydc'"):
        _C.set_cpu_gemm("mkl")


def test_scipy_threads_held_to_one_per_thread_and_given_back():
    """Each thread runs its own single-threaded GEMMs; scipy's OpenBLAS pool must not run beside them, and the
    syrk of pca_accumulate (the same OpenBLAS, called after k-means every epoch) must get its threads back."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from scipy.linalg.cython_blas import __pyx_capi__  # noqa: F401  (loads scipy's OpenBLAS)

    def scipy_openblas_threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpoolctl.threadpool_info()
                if lib["internal_api"] == "openblas" and "scipy.libs" in lib["filepath"]}

    if not scipy_openblas_threads():
        pytest.skip("scipy's BLAS is not a scipy-openblas wheel's OpenBLAS")
    cpu_gemm.use_cpu_gemm("scipy")
    assert _C.cpu_sgemm_threads_settable()
    x, centroids = clustered(3000, 20, 8, seed=0)
    expected = kmeans_assign_reference(x, centroids)[0]
    threads = torch.get_num_threads()
    try:
        with threadpoolctl.threadpool_limits(limits=3, user_api="blas"):
            for torch_threads in (1, 2):
                torch.set_num_threads(torch_threads)
                assert torch.equal(ASSIGN(x, centroids, None, True)[0], expected)
                assert torch.equal(kmeans(x, 20, niter=3, seed=0, backend="torch").labels,
                                   kmeans(x, 20, niter=3, seed=0, backend="torch", bounded=False).labels)
                assert scipy_openblas_threads() == {3}
    finally:
        torch.set_num_threads(threads)
