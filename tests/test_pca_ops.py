"""pca_accumulate and pca_transform: kernels against the float64 references, opcheck, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pydc.ops.pca as pca_ops
from pydc.ops import pca_accumulate, pca_accumulate_reference, pca_transform, pca_transform_reference
from tests.conftest import cpu_and_cuda

ACCUMULATE = torch.ops.pydc.pca_accumulate
TRANSFORM = torch.ops.pydc.pca_transform
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# Relative to the largest entry of the float64 result. The op centres in float64 and rounds each value once
# to the GEMM type: float32 on the CPU for float32/16/bf16 input, the input's own type on CUDA for 16-bit.
ACCUMULATE_TOL = {torch.float64: 1e-12, torch.float32: 2e-6}
CUDA_16BIT_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# On the CPU a 16-bit batch is centred into float32 and multiplied by the float32 GEMM: its centred values are
# coarse (bf16's spacing is 64 at 1e4), and MKL's AVX-512 kernel on an Intel Xeon (family 6 model 167) summed
# them to 2.6e-6 of the scale, above float32's 2e-6 (AMD CPUs: under 2e-6). A shift rounded to float32 errs
# by ~2e-3 there (test_large_offset_costs_no_precision), so 1e-5 still tells the two apart.
CPU_16BIT_TOL = {torch.float16: 1e-5, torch.bfloat16: 1e-5}


def accumulate_tolerance(dtype, device) -> float:
    if dtype in CUDA_16BIT_TOL and device == "cuda":
        return CUDA_16BIT_TOL[dtype]
    if dtype in CPU_16BIT_TOL:
        return CPU_16BIT_TOL[dtype]
    return ACCUMULATE_TOL.get(dtype, ACCUMULATE_TOL[torch.float32])


def features(n, d, dtype=torch.float32, device="cpu", offset=3.0):
    """Correlated random features with a common offset, exactly representable in `dtype`."""
    mixing = torch.randn(d, d, dtype=torch.float64) / d**0.5
    x = torch.randn(n, d, dtype=torch.float64) @ mixing + offset
    return x.to(dtype).to(device)


def empty_state(d, device, gram_dtype=torch.float64):
    return (torch.zeros(d, dtype=torch.float64, device=device),
            torch.zeros(d, d, dtype=gram_dtype, device=device),
            torch.zeros((), dtype=torch.int64, device=device))


def assert_close_relative(actual, expected, tol):
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=tol * scale.item())


# D = 600 and 1100 span three and five of the CPU kernel's 256-tall Gram panels (the last one partial).
SHAPES = [(1, 1), (7, 3), (64, 17), (300, 257), (130, 600), (40, 1100)]


def scipy_syrk_available():
    return pca_ops.use_cpu_syrk("scipy") and pca_ops.cpu_syrk_report()["gram"] == "scipy"


def mkl_syrk_available():
    from pydc import _C

    return bool(_C.has_mkl_syrk())


@pytest.fixture(params=["scipy", "mkl", "pydc", "panels"])
def cpu_gram(request):
    """Runs the test with the CPU kernel's Gram as scipy's BLAS syrk, MKL's, pydc's own syrk, then GEMM panels
    (use_cpu_syrk); afterwards the Gram is auto's choice again."""
    if request.param == "scipy" and not scipy_syrk_available():
        pytest.skip("scipy's BLAS (scipy.linalg.cython_blas) is not importable")
    if request.param == "mkl" and not mkl_syrk_available():
        pytest.skip("torch's libraries hold no MKL ssyrk")
    pca_ops.use_cpu_syrk(request.param)
    yield request.param
    pca_ops.use_cpu_syrk("auto")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gram_dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_accumulate_matches_float64_reference(device, dtype, gram_dtype, shape, cpu_gram):
    if dtype == torch.float64 and gram_dtype == torch.float32:
        pytest.skip("a float64 batch needs a float64 gram")
    if device == "cuda" and cpu_gram != "scipy":
        pytest.skip("the CPU Gram choice does not apply on CUDA")
    n, d = shape
    batch = features(n, d, dtype, device)
    shift = batch[: max(1, n // 2)].double().mean(0) + 0.25  # near, not at, the mean
    sum_, gram, bad = empty_state(d, device, gram_dtype)
    sum_[:] = torch.rand(d, dtype=torch.float64)  # accumulates onto what is there
    gram += 1.0
    ref_sum, ref_gram, ref_bad = sum_.clone(), gram.double().clone(), bad.clone()
    ACCUMULATE(batch, shift, sum_, gram, bad)
    pca_accumulate_reference(batch, shift, ref_sum, ref_gram, ref_bad)
    tol = accumulate_tolerance(dtype, device)
    assert_close_relative(sum_, ref_sum, tol * 4)
    assert_close_relative(gram.triu(), ref_gram.triu(), tol)  # only the upper triangle is defined
    assert int(bad) == 0


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_offset_costs_no_precision(device, dtype):
    # Values around 1e4 whose spread is ~1: centring against a float64 shift that is not a float32 number
    # (the CPU kernel's hi + lo split) must match the float64 reference on the centred scale.
    x = features(500, 24, dtype, device, offset=1.0e4)
    shift = x.double().mean(0) + 1.0 / 3.0
    state, expected = empty_state(24, device), empty_state(24, device)
    ACCUMULATE(x, shift, *state)
    pca_accumulate_reference(x, shift, *expected)
    tol = accumulate_tolerance(dtype, device)
    assert_close_relative(state[1].triu(), expected[1].triu(), tol)
    assert_close_relative(state[0], expected[0], 4 * tol)
    projection = torch.randn(5, 24, device=device)
    out, _ = TRANSFORM(x, shift, projection, 1e-10)
    torch.testing.assert_close(out, pca_transform_reference(x, shift, projection)[0], rtol=0, atol=2e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_accumulate_over_calls_equals_one_call(device):
    batch = features(700, 40, torch.float32, device)
    shift = batch[:100].double().mean(0)
    whole, parts = empty_state(40, device), empty_state(40, device)
    ACCUMULATE(batch, shift, *whole)
    for chunk in batch.split(97):
        ACCUMULATE(chunk, shift, *parts)
    # float32 GEMMs over different row groupings: equal up to float32 rounding of the products.
    assert_close_relative(parts[0], whole[0], 1e-6)
    assert_close_relative(parts[1].triu(), whole[1].triu(), 2e-6)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("layout", ["column_slice", "transposed", "expanded"])
def test_accumulate_strided_batch(device, layout):
    base = features(90, 60, torch.float32, device)
    batch = {"column_slice": base[:, ::2], "transposed": base.T.contiguous().T[:, :30],
             "expanded": base[:1, :30].expand(50, 30)}[layout]
    shift = torch.zeros(30, dtype=torch.float64, device=device)
    state, expected = empty_state(30, device), empty_state(30, device)
    ACCUMULATE(batch, shift, *state)
    pca_accumulate_reference(batch, shift, *expected)
    assert_close_relative(state[1].triu(), expected[1].triu(), 2e-6)
    assert_close_relative(state[0], expected[0], 1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_accumulate_leaves_out_nonfinite_rows(device, poison):
    batch = features(50, 9, torch.float32, device)
    bad_rows = [0, 17, 49]
    batch[bad_rows, [3, 0, 8]] = poison
    shift = torch.zeros(9, dtype=torch.float64, device=device)
    state = empty_state(9, device)
    ACCUMULATE(batch, shift, *state)
    keep = torch.ones(50, dtype=torch.bool)
    keep[bad_rows] = False
    expected = empty_state(9, device)
    pca_accumulate_reference(batch[keep.to(device)], shift, *expected)
    assert int(state[2]) == len(bad_rows)
    assert torch.isfinite(state[1]).all() and torch.isfinite(state[0]).all()
    assert_close_relative(state[1].triu(), expected[1].triu(), 2e-6)
    assert_close_relative(state[0], expected[0], 1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_accumulate_empty_batch_changes_nothing(device):
    state = list(empty_state(5, device))
    state[1] += 2.0
    ACCUMULATE(torch.empty(0, 5, device=device), torch.zeros(5, dtype=torch.float64, device=device), *state)
    assert state[1].eq(2.0).all() and state[0].eq(0).all() and int(state[2]) == 0


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("projection_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 2), (40, 33, 7), (257, 300, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_transform_matches_float64_reference(device, dtype, projection_dtype, shape):
    n, d, k = shape
    x = features(n, d, dtype, device)
    mean = x.double().mean(0) + 0.1  # off the mean, so that no row centres to exactly zero
    projection = torch.randn(k, d, dtype=torch.float64).to(device=device, dtype=projection_dtype)
    out, bad = TRANSFORM(x, mean, projection, 1e-10)
    expected, _ = pca_transform_reference(x, mean, projection)
    assert out.dtype == torch.float32 and out.shape == (n, k) and int(bad) == 0
    tol = 1e-6 if projection_dtype == torch.float64 else 2e-4 * d**0.5
    torch.testing.assert_close(out, expected, rtol=0, atol=tol)
    torch.testing.assert_close(out.double().norm(dim=1), torch.ones(n, dtype=torch.float64, device=device),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_transform_in_chunks(device):
    # The CPU kernel centres 2^23 values at a time: 2048 rows at D = 4096, so 4500 rows take three chunks.
    x = features(4500, 4096, torch.float32, device, offset=0.5)
    mean = x.double().mean(0)
    projection = torch.randn(16, 4096, dtype=torch.float64).to(device)
    out, bad = TRANSFORM(x, mean, projection, 1e-10)
    expected, _ = pca_transform_reference(x, mean, projection)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_transform_zero_rows_and_nonfinite_rows(device):
    x = features(6, 4, torch.float32, device)
    mean = x[2].double()  # row 2 centres to exactly zero and stays 0 (the norm guard)
    x[4, 1] = float("nan")
    x[5, 3] = float("inf")
    out, bad = TRANSFORM(x, mean, torch.randn(3, 4, dtype=torch.float64, device=device), 1e-10)
    assert int(bad) == 2
    assert out[[2, 4, 5]].abs().max() < 1e-6
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_transform_empty_input(device):
    out, bad = TRANSFORM(torch.empty(0, 5, device=device), torch.zeros(5, dtype=torch.float64, device=device),
                         torch.randn(2, 5, device=device), 1e-10)
    assert out.shape == (0, 2) and out.dtype == torch.float32 and int(bad) == 0


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(device):
    x = features(20, 6, torch.float32, device)
    shift = x.double().mean(0)
    for gram_dtype in (torch.float64, torch.float32):
        torch.library.opcheck(ACCUMULATE, (x, shift, *empty_state(6, device, gram_dtype)))
    torch.library.opcheck(TRANSFORM, (x, shift, torch.randn(3, 6, device=device), 1e-10))
    torch.library.opcheck(TRANSFORM, (x.double(), shift, torch.randn(3, 6, dtype=torch.float64, device=device)))


def test_transform_inside_compiled_function():
    torch._dynamo.reset()

    def whiten(x, mean, projection):
        return TRANSFORM(x * 2.0, mean, projection, 1e-10)[0] + 1.0

    x, projection = features(10, 8), torch.randn(4, 8)
    mean = x.double().mean(0)
    compiled = torch.compile(whiten, fullgraph=True)
    torch.testing.assert_close(compiled(x, mean, projection), whiten(x, mean, projection))


@pytest.mark.cuda
def test_cuda_equals_cpu_kernels():
    x = features(3000, 700, torch.float32)
    shift = x[:500].double().mean(0)
    cpu, gpu = empty_state(700, "cpu"), empty_state(700, "cuda")
    ACCUMULATE(x, shift, *cpu)
    ACCUMULATE(x.cuda(), shift.cuda(), *gpu)
    assert_close_relative(gpu[1].cpu().triu(), cpu[1].triu(), 1e-5)
    projection = torch.randn(64, 700)
    out_cpu, _ = TRANSFORM(x, shift, projection, 1e-10)
    out_gpu, _ = TRANSFORM(x.cuda(), shift.cuda(), projection.cuda(), 1e-10)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=0, atol=1e-3)


def _good_accumulate_args():
    x = features(4, 3)
    return [x, torch.zeros(3, dtype=torch.float64), *empty_state(3, "cpu")]


BAD_ACCUMULATE = [
    (0, torch.zeros(4, 3, dtype=torch.int32), "float32, float16, bfloat16 or float64"),
    (0, torch.zeros(4, 3, 2), "2-D"),
    (0, torch.zeros(4, 0), "at least one feature"),
    (1, torch.zeros(4, dtype=torch.float64), "shift"),
    (1, torch.zeros(3, dtype=torch.float32), "shift"),
    (2, torch.zeros(3, dtype=torch.float32), "sum"),
    (3, torch.zeros(3, 4, dtype=torch.float64), "gram"),
    (3, torch.zeros(3, 3, dtype=torch.float16), "gram"),
    (4, torch.zeros(2, dtype=torch.int64), "nonfinite_rows"),
    (4, torch.zeros((), dtype=torch.int32), "nonfinite_rows"),
]


@pytest.mark.parametrize("index,value,message", BAD_ACCUMULATE)
def test_accumulate_bad_input(index, value, message):
    args = _good_accumulate_args()
    args[index] = value
    with pytest.raises(RuntimeError, match=message):
        ACCUMULATE(*args)
    with pytest.raises(ValueError, match=message):
        pca_accumulate(*args)


def test_accumulate_float64_batch_needs_float64_gram():
    args = _good_accumulate_args()
    args[0] = args[0].double()
    args[3] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="gram of dtype float64"):
        ACCUMULATE(*args)
    with pytest.raises(ValueError, match="gram"):
        pca_accumulate(*args)


BAD_TRANSFORM = [
    (0, torch.zeros(4, 3, dtype=torch.uint8), "float32, float16, bfloat16 or float64"),
    (1, torch.zeros(5, dtype=torch.float64), "mean"),
    (2, torch.zeros(2, 4), "projection"),
    (2, torch.zeros(2, 3, dtype=torch.float16), "projection"),
    (3, -1.0, "norm_eps"),
]


@pytest.mark.parametrize("index,value,message", BAD_TRANSFORM)
def test_transform_bad_input(index, value, message):
    args = [features(4, 3), torch.zeros(3, dtype=torch.float64), torch.randn(2, 3), 1e-10]
    args[index] = value
    with pytest.raises(RuntimeError, match=message):
        TRANSFORM(*args)
    with pytest.raises(ValueError, match=message):
        pca_transform(*args)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", [(700, 300), (257, 37), (5, 16)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_syrk_updates_the_upper_triangle_only(dtype, shape, threads):
    """Each syrk (scipy's; MKL's and pydc's for float32, pydc's in 16-column panels with a partial last one,
    6-row strips, rows split between threads by work) adds on and above the diagonal only, as the panels and
    the reference do."""
    n, d = shape
    backends = (["scipy"] if scipy_syrk_available() else []) + (["pydc"] if dtype == torch.float32 else [])
    backends += ["mkl"] if dtype == torch.float32 and mkl_syrk_available() else []
    if not backends:
        pytest.skip("no syrk for float64 grams without scipy's BLAS")
    x = features(n, d, dtype)
    shift = x.double().mean(0)
    ref_sum, ref_gram, ref_bad = empty_state(d, "cpu")
    ref_gram -= 7.0
    pca_accumulate_reference(x, shift, ref_sum, ref_gram, ref_bad)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for backend in backends + ["panels"]:
            pca_ops.use_cpu_syrk(backend)
            assert pca_ops.cpu_syrk_report()["gram"] == backend
            sum_, gram, bad = empty_state(d, "cpu", dtype)
            gram -= 7.0  # the syrk adds on and above the diagonal and leaves the rest as it was
            ACCUMULATE(x, shift, sum_, gram, bad)
            if backend != "panels":
                assert bool((gram.tril(-1) == torch.tril(torch.full_like(gram, -7.0), -1)).all()), backend
            assert_close_relative(gram.triu(), ref_gram.triu(), ACCUMULATE_TOL[dtype])
    finally:
        torch.set_num_threads(previous)
        pca_ops.use_cpu_syrk("auto")


@pytest.mark.parametrize("value", ["blas", "2", "", "openblas"])
def test_bad_syrk_choice_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("PYDC_CPU_SYRK", value)
    with pytest.raises(ValueError, match="PYDC_CPU_SYRK: expected one of auto, pydc, scipy, mkl, panels"):
        pca_ops.syrk_requested()
    with pytest.raises(ValueError, match="use_cpu_syrk: expected one of"):
        pca_ops.use_cpu_syrk(value or "none")


INF = float("inf")


# (scipy's, pydc's, MKL's seconds): the faster BLAS one unless pydc's takes under SYRK_MARGIN of its time
@pytest.mark.parametrize("seconds, expected", [
    ((0.010, 0.009, INF), "pydc"), ((0.010, 0.0096, INF), "scipy"), ((INF, 0.02, INF), "pydc"),
    ((0.010, 0.009, 0.008), "mkl"), ((0.008, 0.0077, 0.009), "scipy"), ((0.012, 0.009, 0.0097), "pydc"),
    ((0.012, 0.0093, 0.0097), "mkl")])
def test_auto_keeps_the_fastest_syrk_and_pydcs_only_when_clearly_faster(monkeypatch, seconds, expected):
    from pydc import _C

    if not scipy_syrk_available():
        pytest.skip("scipy's BLAS (scipy.linalg.cython_blas) is not importable")
    if seconds[2] != INF and not mkl_syrk_available():
        pytest.skip("torch's libraries hold no MKL ssyrk")
    calls = []
    monkeypatch.setattr(_C, "time_cpu_syrks", lambda *args: calls.append(args) or seconds, raising=True)
    monkeypatch.setattr(_C, "has_mkl_syrk", lambda: seconds[2] != INF, raising=True)
    try:
        assert pca_ops.use_cpu_syrk("auto") is True
        report = pca_ops.cpu_syrk_report()
        assert report["gram"] == expected
        assert _C.cpu_float_syrk() == {"pydc": "pydc", "mkl": "mkl"}.get(expected, "blas")
        assert calls == [(*pca_ops.SYRK_MEASURE_SHAPE, pca_ops.SYRK_MEASURE_ROUNDS)]
        assert (report["scipy_s"], report["pydc_s"]) == seconds[:2]
        assert report.get("mkl_s", INF) == seconds[2]
    finally:
        monkeypatch.undo()
        pca_ops.use_cpu_syrk("auto")


def test_a_missing_mkl_syrk_gives_the_panels(monkeypatch):
    """PYDC_CPU_SYRK=mkl with a torch whose libraries hold no MKL ssyrk: the GEMM panels, not scipy's syrk
    (which use_cpu_syrk had set), and the report says why."""
    from pydc import _C

    monkeypatch.setattr(_C, "has_mkl_syrk", lambda: False, raising=True)
    try:
        assert pca_ops.use_cpu_syrk("mkl") is False
        report = pca_ops.cpu_syrk_report()
        assert report["gram"] == "panels" and report["mkl"] == "not in torch's libraries"
        x = features(40, 30, torch.float32)
        shift = x.double().mean(0)
        sum_, gram, bad = empty_state(30, "cpu", torch.float32)
        gram -= 7.0
        ACCUMULATE(x, shift, sum_, gram, bad)
        # the panels write the lower triangle of their diagonal blocks; a syrk would leave it at -7
        assert not bool((gram.tril(-1) == -7.0).all())
    finally:
        monkeypatch.undo()
        pca_ops.use_cpu_syrk("auto")


def test_mkls_syrk_is_used_where_torchs_libraries_hold_it():
    """The lookup finds mkl_blas_ssyrk wherever libtorch_cpu exports it, and its check of one Gram of known
    values passes (a call with the wrong triangle or sizes fails that check and leaves MKL's syrk unused)."""
    import ctypes

    from pydc import _C

    library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    assert bool(_C.has_mkl_syrk()) == hasattr(library, "mkl_blas_ssyrk")


def test_time_cpu_syrks_times_each_and_keeps_the_selection():
    from pydc import _C

    pca_ops.use_cpu_syrk("panels")  # no BLAS syrk set: its time is +inf
    try:
        blas_s, pydc_s, mkl_s = _C.time_cpu_syrks(64, 40, 2)
        assert blas_s == INF and 0 < pydc_s < INF
        assert (0 < mkl_s < INF) if mkl_syrk_available() else mkl_s == INF
        assert _C.cpu_float_syrk() == "blas"
        with pytest.raises(RuntimeError, match="expects positive rows"):
            _C.time_cpu_syrks(0, 4, 1)
    finally:
        pca_ops.use_cpu_syrk("auto")


def test_set_cpu_syrk_checks_its_arguments():
    from pydc import _C

    blas = pytest.importorskip("scipy.linalg.cython_blas").__pyx_capi__
    before = _C.has_cpu_syrk()
    with pytest.raises(TypeError, match="scipy.linalg.cython_blas capsule or None"):
        _C.set_cpu_syrk(object(), None)
    with pytest.raises(ValueError, match=r"expected scipy.linalg.cython_blas.__pyx_capi__\['ssyrk'\]"):
        _C.set_cpu_syrk(blas["dsyrk"], None)  # the float64 routine in the float32 slot
    with pytest.raises(ValueError, match="dsyrk"):
        _C.set_cpu_syrk(blas["ssyrk"], blas["sgemm"])
    assert _C.has_cpu_syrk() == before  # a refused call changes nothing


def test_use_cpu_syrk_keeps_panels_when_scipy_offers_no_syrk(monkeypatch):
    """scipy's capsules not ?syrk: "scipy" falls back to the panels (auto would take pydc's syrk)."""
    from pydc import _C

    blas = pytest.importorskip("scipy.linalg.cython_blas").__pyx_capi__
    monkeypatch.setitem(blas, "ssyrk", blas["sgemm"])  # a capsule that is not ?syrk
    try:
        with pytest.warns(RuntimeWarning, match="GEMM panels instead"):
            assert pca_ops.use_cpu_syrk("scipy") is False
        assert not _C.has_cpu_syrk()
        x = features(50, 20)
        sum_, gram, bad = empty_state(20, "cpu", torch.float32)
        pca_ops.pca_accumulate(x, x.double().mean(0), sum_, gram, bad)  # still works, through the panels
        ref_sum, ref_gram, ref_bad = empty_state(20, "cpu")
        pca_accumulate_reference(x, x.double().mean(0), ref_sum, ref_gram, ref_bad)
        assert_close_relative(gram.triu(), ref_gram.triu(), ACCUMULATE_TOL[torch.float32])
    finally:
        monkeypatch.undo()
        pca_ops.use_cpu_syrk(True)


def _python_output(script, env_without, **extra_env):
    """stdout of `python -c script` in a fresh process, from the repository root, with `env_without` removed
    from this process's environment and extra_env added."""
    env = {key: value for key, value in os.environ.items() if key != env_without} | extra_env
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_sets_openblas_thread_timeout_unless_set():
    # scipy's OpenBLAS (the CPU Gram's syrk) reads it when it loads; pydc only supplies a default
    script = "import os, pydc; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    assert _python_output(script, "OPENBLAS_THREAD_TIMEOUT") == "20"
    assert _python_output(script, "OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT="7") == "7"


def test_first_cpu_call_picks_the_syrk_unless_disabled():
    pytest.importorskip("scipy.linalg.cython_blas")
    script = ("import torch, pydc.ops.pca as p; from pydc import _C; x = torch.randn(9, 4); "
              "s = torch.zeros(4, dtype=torch.float64); g = torch.zeros(4, 4); n = torch.zeros((), dtype=torch.int64); "
              "before = _C.has_cpu_syrk(); p.pca_accumulate(x, s, s.clone(), g, n); print(before, _C.has_cpu_syrk())")
    assert _python_output(script, "PYDC_CPU_SYRK") == "False True"
    assert _python_output(script, "PYDC_CPU_SYRK", PYDC_CPU_SYRK="0") == "False False"
    assert _python_output(script, "PYDC_CPU_SYRK", PYDC_CPU_SYRK="panels") == "False False"
    pydc_script = script.replace("print(before, _C.has_cpu_syrk())", "print(before, _C.cpu_float_syrk())")
    assert _python_output(pydc_script, "PYDC_CPU_SYRK", PYDC_CPU_SYRK="pydc") == "False pydc"


def test_fallback_without_compiled_ops(monkeypatch):
    monkeypatch.setattr(pca_ops, "HAS_OPS", False)
    monkeypatch.setattr(pca_ops, "_FALLBACK_CHUNK_ROWS", 7)
    x = features(30, 5)
    shift = x.double().mean(0)
    state, expected = empty_state(5, "cpu"), empty_state(5, "cpu")
    with pytest.warns(RuntimeWarning, match="pure-torch reference"):
        pca_ops.pca_accumulate(x, shift, *state)
    ACCUMULATE(x, shift, *expected)
    assert_close_relative(state[1].triu(), expected[1].triu(), 2e-6)
    projection = torch.randn(2, 5)
    with pytest.warns(RuntimeWarning, match="pure-torch reference"):
        out, bad = pca_ops.pca_transform(x, shift, projection)
    torch.testing.assert_close(out, TRANSFORM(x, shift, projection, 1e-10)[0], rtol=0, atol=1e-5)
    assert int(bad) == 0
