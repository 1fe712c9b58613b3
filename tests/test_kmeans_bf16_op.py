"""kmeans_assign_bf16 (csrc/ops/cpu/kmeans_bf16_kernel.cpp): kmeans_assign's labels, exactly, from a bfloat16
GEMM that only screens the centroids; and the choice of pydc.ops.bf16_screen.

The bfloat16 rounding moves a score by ~2^-9 of ||x|| ||c||, so points whose two nearest centroids are closer than
that (near the bisector, duplicates, exact ties) get their order from the screen wrong unless the error bound
keeps both as candidates for the float64 settle: those are the cases here, at every ISA level (the fold and the
rounding norms are per-level kernels), and at scales where the bound's terms differ (tiny, large, offset data),
with each bfloat16 GEMM the CPU can run (MKL's; pydc's own AVX512-BF16 kernel where the CPU has AVX512-BF16).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from pydc.ops import bf16_screen
from pydc.ops.cpu_capability import LEVELS, cpu_capability_level, supported_levels
from tests.test_kmeans_bounded import assert_group_bounds_hold

pytestmark = pytest.mark.skipif(not bf16_screen.available(),
                                reason="needs MKL's bfloat16 GEMM in torch or a CPU with AVX512-BF16")


def gemms():
    """The bfloat16 GEMMs kmeans_assign_bf16 can run here ("none" where it cannot run: the module is skipped)."""
    if not bf16_screen.available():
        return ["none"]
    names = []
    for name in ("mkl", "pydc"):
        try:
            with bf16_gemm(name):
                names.append(name)
        except RuntimeError:
            pass
    return names or ["none"]


@contextlib.contextmanager
def bf16_gemm(name):
    """Runs the body with kmeans_assign_bf16 on the named GEMM, then back to auto."""
    from pydc import _C

    _C.set_bf16_gemm(name)
    try:
        yield
    finally:
        _C.set_bf16_gemm("auto")


def assign_both(x, centroids):
    norms = (x * x).sum(1)
    plain = torch.ops.pydc.kmeans_assign(x, centroids, norms, True)
    screened = torch.ops.pydc.kmeans_assign_bf16(x, x.to(torch.bfloat16), centroids, norms)
    return plain, screened


def bisector_points(n=3000, d=48, k=24, offset=1e-4, seed=0):
    """Points a tiny step (offset, relative, far below bfloat16's 2^-9 but far above float32's rounding) from the
    bisector of two centroids, on either side: the exact winner is known, the bfloat16 ranking is a coin toss."""
    generator = torch.Generator().manual_seed(seed)
    centroids = torch.randn(k, d, generator=generator)
    a, b = torch.randint(0, k, (2, n), generator=generator)
    b = torch.where(a == b, (b + 1) % k, b)
    middle = (centroids[a] + centroids[b]) / 2
    direction = centroids[a] - centroids[b]
    side = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).unsqueeze(1)
    along = torch.randn(n, d, generator=generator) * 0.3
    along -= (along * direction).sum(1, keepdim=True) / (direction * direction).sum(1, keepdim=True) * direction
    x = middle + along + side * offset * direction
    return x, centroids


def cases():
    generator = torch.Generator().manual_seed(1)
    means = torch.randn(30, 32, generator=generator) * 3
    clustered = means[torch.randint(0, 30, (4000,), generator=generator)] + torch.randn(4000, 32, generator=generator)
    sphere = torch.nn.functional.normalize(torch.randn(5000, 64, generator=generator), dim=1)
    x, c = bisector_points()
    duplicates = torch.cat([clustered[:500]] * 3)
    # the rounding of one side alone: centroids that bfloat16 holds exactly (small integers) with points that it
    # does not, and points it holds exactly (rounded near the bisector) with centroids it does not
    c_int = (bisector_points(d=4, k=12, seed=2)[1] * 4).round()
    pairs = torch.arange(3000)
    x_int = (c_int[pairs % 12] + c_int[(pairs + 5) % 12]) / 2 + torch.randn(3000, 4, generator=generator) * 1e-3
    x_exact = bisector_points(d=4, k=12, offset=0.0, seed=3)[0].to(torch.bfloat16).float()
    c_exact = bisector_points(d=4, k=12, seed=3)[1]
    return {
        "clustered": (clustered, clustered[:40].clone()),
        "unstructured": (sphere, sphere[:100] * 0.4),
        "bisector": (x, c),
        "bisector_tiny": (x * 1e-30, c * 1e-30),   # bfloat16 denormals: the flush slack
        "bisector_large": (x * 1e15, c * 1e15),
        "bisector_offset": (x + 100.0, c + 100.0),  # ||x||, ||c|| far above the distances
        "duplicates_and_ties": (duplicates, torch.cat([clustered[:20], clustered[:20]])),  # equal centroids
        "exact_centroids": (x_int, c_int),
        "exact_points": (x_exact, c_exact),
        # an odd number of features (pydc's GEMM multiplies pairs of them) and a k that fills no 32-centroid panel
        "bisector_odd_d": bisector_points(n=1000, d=37, k=45, seed=4),
    }


@pytest.mark.parametrize("gemm", gemms())
@pytest.mark.parametrize("level", LEVELS)
def test_labels_are_kmeans_assigns(level, gemm):
    if level not in supported_levels():
        pytest.skip(f"CPU lacks {level}")
    with cpu_capability_level(level), bf16_gemm(gemm):
        for name, (x, centroids) in cases().items():
            (plain_labels, plain_distances), (labels, distances) = assign_both(x, centroids)
            assert torch.equal(labels, plain_labels), name
            scale = (x * x).sum(1).max()
            torch.testing.assert_close(distances, plain_distances, rtol=1e-4, atol=1e-5 * float(scale), msg=name)


def test_the_screen_alone_would_get_the_bisector_wrong():
    """The cases above need the settle: ranked by the bfloat16 scores alone, many bisector points go the wrong
    way (so a bound that leaves out a rounding term, or a settle that trusts the screen, fails them)."""
    x, centroids = bisector_points()
    xb, cb = x.to(torch.bfloat16).float(), centroids.to(torch.bfloat16).float()
    screen_only = ((cb * cb).sum(1) - 2 * xb @ cb.T).argmin(1)
    plain, _ = torch.ops.pydc.kmeans_assign(x, centroids, None, True)
    assert int((screen_only != plain).sum()) > 100


def test_bad_input_is_refused_with_a_message():
    x, centroids = bisector_points(n=50)
    norms = (x * x).sum(1)
    with pytest.raises(RuntimeError, match="x_bf16"):
        torch.ops.pydc.kmeans_assign_bf16(x, x, centroids, norms)  # float32, not bfloat16
    with pytest.raises(RuntimeError, match="shape of x"):
        torch.ops.pydc.kmeans_assign_bf16(x, x[:10].to(torch.bfloat16), centroids, norms)
    bad = x.clone()
    bad[7, 3] = float("nan")
    with pytest.raises(RuntimeError, match="finite points"):
        torch.ops.pydc.kmeans_assign_bf16(bad, bad.to(torch.bfloat16), centroids, norms)
    bad_centroids = centroids.clone()
    bad_centroids[2, 0] = float("inf")
    with pytest.raises(RuntimeError, match="finite centroids"):
        torch.ops.pydc.kmeans_assign_bf16(x, x.to(torch.bfloat16), bad_centroids, norms)
    with pytest.raises(RuntimeError, match="cannot overflow"):  # float32 scores would: kmeans_assign's domain
        torch.ops.pydc.kmeans_assign_bf16(x, x.to(torch.bfloat16), centroids * 1e20, norms)


def test_opcheck():
    x, centroids = bisector_points(n=200)
    torch.library.opcheck(torch.ops.pydc.kmeans_assign_bf16, (x, x.to(torch.bfloat16), centroids, (x * x).sum(1)))


def test_the_choice_follows_the_setting_and_the_level(monkeypatch):
    monkeypatch.setenv(bf16_screen.ENV_VAR, "off")
    assert not bf16_screen.use_bf16_screen()
    monkeypatch.setenv(bf16_screen.ENV_VAR, "on")
    assert bf16_screen.use_bf16_screen()
    monkeypatch.setenv(bf16_screen.ENV_VAR, "auto")
    with cpu_capability_level("avx2" if "avx2" in supported_levels() else "default"):
        assert not bf16_screen.use_bf16_screen()  # below avx512: float32, no measurement
    # at avx512: AMX-BF16 with MKL's GEMM decides without a measurement, otherwise the measurement (here made to
    # lose)
    if "avx512" in supported_levels() and "mkl" in gemms():
        monkeypatch.setenv(bf16_screen.GEMM_ENV_VAR, "mkl")
        with cpu_capability_level("avx512"):
            monkeypatch.setattr(bf16_screen, "_chosen", {})
            monkeypatch.setattr(bf16_screen, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
            monkeypatch.setattr(bf16_screen, "measure", lambda: pytest.fail("measured despite AMX-BF16"))
            assert bf16_screen.use_bf16_screen()
            monkeypatch.setattr(bf16_screen, "_chosen", {})
            monkeypatch.setattr(bf16_screen, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
            monkeypatch.setattr(bf16_screen, "measure", lambda: (1.0, 0.95))
            assert not bf16_screen.use_bf16_screen()
            assert bf16_screen.bf16_screen_report()["chosen"] is False
    monkeypatch.setenv(bf16_screen.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="PYDC_KMEANS_BF16"):
        bf16_screen.use_bf16_screen()
    monkeypatch.setenv(bf16_screen.GEMM_ENV_VAR, "openblas")
    with pytest.raises(ValueError, match="PYDC_BF16_GEMM"):
        bf16_screen.available()


def test_auto_gemm_is_pydcs_only_where_the_cpu_has_avx512_bf16_at_the_avx512_level(monkeypatch):
    from pydc import _C

    monkeypatch.delenv(bf16_screen.GEMM_ENV_VAR, raising=False)
    bf16_screen.apply_gemm_setting()
    for name in ("none", "amx", ""):
        with pytest.raises(ValueError, match="expected 'auto', 'mkl' or 'pydc'"):
            _C.set_bf16_gemm(name)
    own = _C.cpu_has_avx512_bf16() and "amx_bf16" not in bf16_screen.cpu_flags()
    for level in supported_levels():
        with cpu_capability_level(level):
            expected = "pydc" if own and level == "avx512" else "mkl" if "mkl" in gemms() else "none"
            assert _C.bf16_gemm() == expected, level
    if not _C.cpu_has_avx512_bf16():
        monkeypatch.setenv(bf16_screen.GEMM_ENV_VAR, "pydc")
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            bf16_screen.apply_gemm_setting()
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            bf16_screen.pydc_bf16_gemm(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.bfloat16))


needs_avx512_bf16 = pytest.mark.skipif("pydc" not in gemms(), reason="needs a CPU with AVX512-BF16")


@needs_avx512_bf16
@pytest.mark.parametrize("m, n, d", [(256, 1000, 256), (25, 50, 65), (13, 33, 37), (12, 16, 2), (1, 1, 1)])
def test_pydc_bf16_gemm_sums_the_exact_products_in_float32(m, n, d):
    """Every tile shape (12-row tiles and a tail, full and partial 32-centroid panels, an odd feature): each
    result is the exact sum of the bfloat16 products within gamma_d of the sum of their magnitudes."""
    generator = torch.Generator().manual_seed(m + n + d)
    a = (torch.randn(m, d, generator=generator) * torch.logspace(-3, 3, d)).to(torch.bfloat16)
    b = torch.randn(n, d, generator=generator).to(torch.bfloat16)
    out = bf16_screen.pydc_bf16_gemm(a, b)
    exact = a.double() @ b.double().T
    u = 2.0 ** -24
    gamma = d * u / (1 - d * u)
    bound = gamma * (a.double().abs() @ b.double().abs().T)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert bool(((out.double() - exact).abs() <= bound).all())


@needs_avx512_bf16
def test_pydc_bf16_gemm_refuses_what_it_cannot_multiply():
    a = torch.ones(4, 6, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        bf16_screen.pydc_bf16_gemm(a.float(), a)
    with pytest.raises(ValueError, match=r"\(m, d\)"):
        bf16_screen.pydc_bf16_gemm(a, a[:, :5])


@pytest.mark.parametrize("gemm", gemms())
@pytest.mark.parametrize("name", ["clustered", "bisector", "exact_centroids", "exact_points"])
def test_screened_bounds_hold(name, gemm):
    """kmeans_assign_bounds_bf16: kmeans_assign_bounds's labels (original indices through centroid_ids), upper >=
    the exact distance to the chosen centroid and every group lower bound <= the exact distance to the group's
    other members, with groups of uneven size and an empty one."""
    x, centroids = cases()[name]
    k = centroids.shape[0]
    order = torch.randperm(k, generator=torch.Generator().manual_seed(3))
    offsets = torch.tensor([0, k // 5, k // 5, k // 2, k])  # an empty group too
    norms = (x * x).sum(1)
    with bf16_gemm(gemm):
        labels, distances, upper, lower = torch.ops.pydc.kmeans_assign_bounds_bf16(
            x, x.to(torch.bfloat16), centroids[order], order, offsets, norms)
    plain_labels, _, _, _ = torch.ops.pydc.kmeans_assign_bounds(x, centroids[order], order, offsets, norms)
    assert torch.equal(labels, plain_labels)
    assert_group_bounds_hold(x, centroids, order, offsets, labels, upper, lower)
    torch.library.opcheck(torch.ops.pydc.kmeans_assign_bounds_bf16,
                          (x[:64], x[:64].to(torch.bfloat16), centroids[order], order, offsets, norms[:64]))
