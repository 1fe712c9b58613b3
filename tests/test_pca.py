"""PCAWhitening: equivalence to faiss.PCAMatrix + row L2 normalization, streaming, precision, edge cases."""

from __future__ import annotations

import io
import math
import sys

import numpy as np
import pytest
import torch

import pydc.cluster.pca as pca_module
from pydc.cluster import PCAWhitening
from tests.conftest import cpu_and_cuda


def spectral_features(n, d, offset=1.0, decay=1.2, dtype=torch.float32, seed=0):
    """Features with a power-law spectrum (like CNN features): eigenvalues ~ 1 / (i + 1)^decay, random axes."""
    generator = torch.Generator().manual_seed(seed)
    axes, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=generator))
    scales = (torch.arange(d, dtype=torch.float64) + 1.0) ** (-decay / 2)
    x = (torch.randn(n, d, dtype=torch.float64, generator=generator) * scales) @ axes.T + offset
    return x.to(dtype)


def reference_whitening(x: torch.Tensor, k: int, power: float = -0.5, eps: float = 0.0):
    """The documented semantics in float64 with a two-pass covariance: (mean, components (k, D), eigenvalues)."""
    x = x.double()
    mean = x.mean(0)
    covariance = (x - mean).T @ (x - mean) / x.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    return mean, eigenvectors.flip(1)[:, :k].T, eigenvalues.flip(0)[:k]


def reference_transform(x, mean, components, eigenvalues, power=-0.5, eps=0.0):
    y = (x.double() - mean) @ components.T * (eigenvalues + eps) ** power
    return y / (y.norm(dim=1, keepdim=True) + 1e-10)


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angles (radians) between the row spaces of a and b."""
    qa, _ = torch.linalg.qr(a.double().T)
    qb, _ = torch.linalg.qr(b.double().T)
    return torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0))


def align_signs(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """ours with each column's sign flipped to agree with theirs (eigenvector signs are arbitrary)."""
    return ours * torch.sign((ours.double() * theirs.double()).sum(0)).to(ours.dtype)


def lloyd_objective(x: torch.Tensor, centroids: torch.Tensor, iterations: int = 20) -> float:
    """Plain k-means (Lloyd) from the given centroids; returns the final sum of squared distances."""
    x, centroids = x.double(), centroids.double().clone()
    for _ in range(iterations):
        labels = torch.cdist(x, centroids).argmin(1)
        for c in range(centroids.shape[0]):
            members = x[labels == c]
            if len(members):
                centroids[c] = members.mean(0)
    return float(torch.cdist(x, centroids).min(1).values.pow(2).sum())


@pytest.fixture(scope="module")
def faiss_case():
    faiss = pytest.importorskip("faiss")
    n, d, k = 6000, 96, 24
    # Centred features: faiss forms x^T x - n mean mean^T in float32, which loses digits to any common
    # offset (see test_more_precise_than_faiss_with_an_offset); at offset 0 it is accurate to ~2e-6.
    x = spectral_features(n, d, offset=0.0)
    pca = faiss.PCAMatrix(d, k, -0.5)
    pca.train(x.numpy())
    theirs = pca.apply(x.numpy())
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    faiss_components = faiss.vector_to_array(pca.PCAMat).reshape(d, d)[:k]
    return x, k, torch.from_numpy(theirs), torch.from_numpy(faiss_components.copy()), pca


def test_subspace_equals_faiss(faiss_case):
    x, k, _, faiss_components, _ = faiss_case
    whitening = PCAWhitening(k).fit(x)
    assert principal_angles(whitening.components_, faiss_components).max() < 1e-3


def test_rows_equal_faiss_up_to_sign(faiss_case):
    x, k, theirs, _, _ = faiss_case
    ours = PCAWhitening(k).fit_transform(x)
    torch.testing.assert_close(align_signs(ours, theirs), theirs, rtol=0, atol=2e-5)


def test_more_precise_than_faiss_with_an_offset():
    faiss = pytest.importorskip("faiss")
    x, k = spectral_features(6000, 96, offset=5.0), 24
    pca = faiss.PCAMatrix(96, k, -0.5)
    pca.train(x.numpy())
    theirs = torch.from_numpy(pca.apply(x.numpy()))
    theirs = theirs / theirs.norm(dim=1, keepdim=True)
    mean, components, eigenvalues = reference_whitening(x, k)
    exact = reference_transform(x, mean, components, eigenvalues).float()
    ours = PCAWhitening(k).fit_transform(x)
    assert (align_signs(ours, exact) - exact).abs().max() < 1e-5
    assert (align_signs(theirs, exact) - exact).abs().max() > 1e-3  # faiss's float32 moments


def test_eigenvalues_are_faiss_over_n(faiss_case):
    # faiss's eigenvalues are those of the scatter matrix n * C; pydc's are of the covariance C.
    x, k, _, _, pca = faiss_case
    import faiss

    faiss_eigenvalues = torch.from_numpy(faiss.vector_to_array(pca.eigenvalues)[:k].astype(np.float64))
    whitening = PCAWhitening(k).fit(x)
    torch.testing.assert_close(whitening.eigenvalues_ * x.shape[0], faiss_eigenvalues, rtol=1e-4, atol=0)


def test_whitened_covariance_is_identity(faiss_case):
    x, k, _, _, _ = faiss_case
    whitening = PCAWhitening(k).fit(x)
    raw = (x.double() - whitening.mean_) @ (whitening.scale_[:, None] * whitening.components_.double()).T
    covariance = raw.T @ raw / x.shape[0]
    torch.testing.assert_close(covariance, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-5)


def test_kmeans_objective_matches_faiss(faiss_case):
    x, k, theirs, _, _ = faiss_case
    ours = PCAWhitening(k).fit(x).transform(x)
    start = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))[:50]
    # Same initial centroids: the same rows, each in its own space (a sign flip per coordinate is an isometry).
    objective_ours = lloyd_objective(ours, ours[start])
    objective_faiss = lloyd_objective(theirs, theirs[start])
    assert abs(objective_ours - objective_faiss) <= 0.01 * objective_faiss


def test_eps_is_faiss_epsilon_over_n(faiss_case):
    faiss = pytest.importorskip("faiss")
    x, k, _, _, _ = faiss_case
    eps = 0.05
    pca = faiss.PCAMatrix(x.shape[1], k, -0.5)
    pca.epsilon = eps * x.shape[0]
    pca.train(x.numpy())
    theirs = torch.from_numpy(pca.apply(x.numpy()))
    theirs = theirs / theirs.norm(dim=1, keepdim=True)
    ours = PCAWhitening(k, eps=eps).fit_transform(x)
    torch.testing.assert_close(align_signs(ours, theirs), theirs, rtol=0, atol=2e-5)
    plain = PCAWhitening(k).fit_transform(x)
    assert (align_signs(plain, theirs) - theirs).abs().max() > 1e-3  # eps does change the result


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("power", [-0.5, 0.0, -1.0])
def test_matches_float64_reference(device, power):
    x = spectral_features(3000, 40, offset=2.0, dtype=torch.float64)
    k = 12
    whitening = PCAWhitening(k, eigen_power=power).fit(x.to(device))
    mean, components, eigenvalues = reference_whitening(x, k)
    torch.testing.assert_close(whitening.mean_.cpu(), mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(whitening.eigenvalues_.cpu(), eigenvalues, rtol=1e-10, atol=0)
    assert principal_angles(whitening.components_, components).max() < 1e-5
    out = whitening.transform(x.to(device)).cpu()
    expected = reference_transform(x, mean, components, eigenvalues, power)
    assert out.dtype == torch.float32
    torch.testing.assert_close(align_signs(out, expected.float()), expected.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_partial_fit_batches_equal_fit(device):
    x = spectral_features(2000, 30, offset=4.0).to(device)
    streamed = PCAWhitening(8, flush_rows=300)
    for batch in x.split(128):
        streamed.partial_fit(batch)
    whole = PCAWhitening(8).fit(x)
    assert streamed.n_samples_seen_ == whole.n_samples_seen_ == 2000
    # float32 products summed in another order (other chunk boundaries; syrk or GEMM blocking) agree to ~1e-7 of
    # the largest entry, not of each entry: the tolerance is relative to the matrix
    covariance = whole.get_covariance()
    torch.testing.assert_close(streamed.get_covariance(), covariance, rtol=0,
                               atol=1e-6 * float(covariance.abs().max()))
    torch.testing.assert_close(streamed.transform(x), whole.transform(x), rtol=0, atol=1e-4)


def test_million_rows_with_large_offset_keep_precision():
    # 10^6 float32 rows around 10^4: faiss's one-pass float32 formula x^T x / n - mean mean^T cancels away
    # about 8 of float32's 7 digits here; the shifted moments keep the covariance to ~1e-6 (float32 GEMMs
    # over at most 4096-row chunks, summed in float32 over at most 2 * flush_rows rows, then in float64).
    n, d = 1_000_000, 6
    x = (spectral_features(n, d, offset=0.0, decay=0.5) + 1.0e4).float()
    whitening = PCAWhitening(3, fit_batch_rows=50_000)
    whitening.fit(x)
    x64 = x.double()
    centred = x64 - x64.mean(0)
    exact = centred.T @ centred / n
    error = (whitening.get_covariance() - exact).abs().max() / exact.abs().max()
    assert error < 3e-6
    naive = x.T @ x / n - torch.outer(x.mean(0), x.mean(0))  # what a float32 one-pass fit computes
    assert (naive.double() - exact).abs().max() / exact.abs().max() > 1e-3  # the test can tell the difference


def test_covariance_across_row_blocks_equals_float64():
    """Above the 256-row blocks in which the covariance is mirrored from the Gram's upper triangle, both
    triangles are the float64 covariance's; and the moments about another shift are symmetric too."""
    x = spectral_features(2000, 600, dtype=torch.float64, seed=3)
    whitening = PCAWhitening(8).fit(x)
    centred = x - x.mean(0)
    exact = centred.T @ centred / x.shape[0]
    covariance = whitening.get_covariance()
    assert torch.equal(covariance, covariance.T)
    torch.testing.assert_close(covariance, exact, rtol=1e-9, atol=1e-12)
    _, gram = whitening.moments_about(torch.zeros(600, dtype=torch.float64))
    assert torch.equal(gram, gram.T)
    torch.testing.assert_close(gram, x.T @ x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n,d,k", [(4000, 300, 40), (4000, 200, 190), (50, 300, 80)])
def test_refined_eigh_matches_full_float64_eigh(monkeypatch, n, d, k):
    # The path taken above FULL_EIGH_MAX_DIM features (float32 eigh + float64 power and Rayleigh-Ritz steps),
    # forced at small sizes; the last case is rank deficient (rank 49 < k).
    monkeypatch.setattr(pca_module, "FULL_EIGH_MAX_DIM", 16)
    x = spectral_features(n, d, dtype=torch.float64)
    centred = x - x.mean(0)
    covariance = centred.T @ centred / n
    values, vectors = pca_module.top_eigenpairs(covariance, k)
    exact_values, exact_vectors = torch.linalg.eigh(covariance)
    exact_values, exact_vectors = exact_values.flip(0)[:k], exact_vectors.flip(1)[:, :k]
    rank = min(k, n - 1)
    torch.testing.assert_close(values[:rank], exact_values[:rank], rtol=1e-9, atol=0)
    assert all(abs(float(v)) < 1e-10 * float(values[0]) for v in values[rank:])
    assert principal_angles(vectors[:, :rank].T, exact_vectors[:, :rank].T).max() < 1e-5
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)


def _symmetric_with_spectrum(d, seed=0):
    """A float32 symmetric matrix Q diag(values) Q^T: eigenvalues 1 / (i + 1), but 8 equal ones at indices
    40-47 and 20 zeros at the bottom; and its float64 eigenvectors of the top 40."""
    generator = torch.Generator().manual_seed(seed)
    axes, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=generator))
    values = 1.0 / (torch.arange(d, dtype=torch.float64) + 1.0)
    values[40:48] = values[40]
    values[-20:] = 0.0
    matrix = (axes * values) @ axes.T
    return ((matrix + matrix.T) / 2).to(torch.float32), axes[:, :40]


@pytest.mark.parametrize("solver", ["lapack", "torch", "lapack-failure"])
def test_top_float32_vectors_span_the_top_eigenspace(monkeypatch, solver):
    # The float32 basis that top_eigenpairs refines: LAPACK's reduction, divide and conquer and
    # back-transformation of the top m vectors (scipy), torch.linalg.eigh without scipy, and torch's where
    # LAPACK reports a failure.
    pytest.importorskip("scipy")
    from scipy.linalg import lapack

    d, m = 240, 44
    matrix, top = _symmetric_with_spectrum(d)
    calls = []
    real_dc = pca_module._top_vectors_dc
    monkeypatch.setattr(pca_module, "_top_vectors_dc", lambda a, m: calls.append(m) or real_dc(a, m))
    if solver == "torch":
        monkeypatch.setitem(sys.modules, "scipy.linalg.lapack", None)  # import fails: no scipy
    if solver == "lapack-failure":
        def failing_sstevd(d, e, **kwargs):  # info > 0: an eigenvalue that did not converge
            return d, np.zeros((d.size, d.size), np.float32), 1

        monkeypatch.setattr(lapack, "sstevd", failing_sstevd)
    before = matrix.clone()
    vectors = pca_module._top_vectors32(matrix, m)
    assert calls == ([] if solver == "torch" else [m])
    assert torch.equal(matrix, before)
    assert vectors.shape == (d, m) and vectors.dtype == torch.float32
    vectors = vectors.double()
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(m, dtype=torch.float64), rtol=0, atol=1e-5)
    # span(vectors) holds the top 40 eigenvectors and 4 directions of the 8-fold eigenvalue the 44th falls in
    assert principal_angles(vectors.T, top.T).max() < 1e-4
    spectrum = torch.linalg.eigvalsh(vectors.T @ matrix.double() @ vectors).flip(0)
    expected = 1.0 / (torch.arange(40, dtype=torch.float64) + 1.0)
    torch.testing.assert_close(spectrum[:40], expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(spectrum[40:], torch.full_like(spectrum[40:], 1.0 / 41), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features(dtype):
    x = spectral_features(1500, 32, offset=0.5).to(dtype)
    ours = PCAWhitening(6).fit(x)
    exact = PCAWhitening(6).fit(x.float())  # the same (rounded) values in float32
    assert principal_angles(ours.components_, exact.components_).max() < 1e-4
    out = ours.transform(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, exact.transform(x.float()), rtol=0, atol=1e-4)


def test_fewer_rows_than_components_gives_zero_columns_not_nan():
    x = spectral_features(10, 32)
    whitening = PCAWhitening(16)
    with pytest.warns(RuntimeWarning, match=r"7 of the 16 components .* output columns are 0"):
        whitening.fit(x)  # 10 centred rows span at most 9 dimensions
    out = whitening.transform(x)
    assert torch.isfinite(out).all()
    assert out[:, 9:].abs().max() == 0
    torch.testing.assert_close(out.norm(dim=1), torch.ones(10), rtol=0, atol=1e-5)
    mean, components, eigenvalues = reference_whitening(x, 9)
    expected = reference_transform(x, mean, components, eigenvalues).float()
    torch.testing.assert_close(align_signs(out[:, :9], expected), expected, rtol=0, atol=1e-3)


def test_fewer_rows_than_features_within_the_rank():
    x = spectral_features(40, 64, dtype=torch.float64)
    whitening = PCAWhitening(8).fit(x)  # rank 39 >= 8: no warning, an exact fit
    mean, components, eigenvalues = reference_whitening(x, 8)
    assert principal_angles(whitening.components_, components).max() < 1e-5


def test_constant_columns():
    x = spectral_features(500, 20)
    x[:, 3] = 5.0
    x[:, 11] = -2.0
    whitening = PCAWhitening(10).fit(x)
    assert whitening.components_[:, [3, 11]].abs().max() < 1e-6
    out = whitening.transform(x)
    assert torch.isfinite(out).all()
    mean, components, eigenvalues = reference_whitening(x, 10)
    expected = reference_transform(x, mean, components, eigenvalues).float()
    torch.testing.assert_close(align_signs(out, expected), expected, rtol=0, atol=1e-4)


def test_all_constant_data_gives_zero_rows():
    x = torch.full((30, 5), 7.0)
    whitening = PCAWhitening(2)
    with pytest.warns(RuntimeWarning, match="2 of the 2 components"):
        whitening.fit(x)
    assert whitening.transform(x).eq(0).all()


def test_more_components_than_features_is_an_error():
    with pytest.raises(ValueError, match="n_components=9 exceeds the 8 features"):
        PCAWhitening(9).fit(torch.randn(100, 8))
    with pytest.raises(ValueError, match="n_components=9 exceeds the 8 features"):
        PCAWhitening(9).partial_fit(torch.randn(100, 8))


def test_nonfinite_rows_in_partial_fit_are_named_and_left_out():
    x = spectral_features(100, 6)
    dirty = x.clone()
    dirty[[5, 50], 2] = float("nan")
    dirty[70, 0] = float("inf")
    whitening = PCAWhitening(3)
    with pytest.raises(ValueError, match="3 of 100 rows of the batch contain NaN or Inf"):
        whitening.partial_fit(dirty)
    assert whitening.n_samples_seen_ == 97
    keep = torch.ones(100, dtype=torch.bool)
    keep[[5, 50, 70]] = False
    clean = PCAWhitening(3).fit(x[keep])
    torch.testing.assert_close(whitening.get_covariance(), clean.get_covariance(), rtol=1e-6, atol=1e-9)


def test_nonfinite_rows_in_fit_are_counted_over_all_chunks():
    x = spectral_features(100, 6)
    x[[1, 40, 99], 3] = float("nan")
    with pytest.raises(ValueError, match="3 of 100 rows of x contain NaN or Inf"):
        PCAWhitening(3, fit_batch_rows=30).fit(x)


def test_nonfinite_first_batch_still_gives_a_finite_shift():
    x = spectral_features(50, 4, offset=100.0)
    x[0, 0] = float("inf")
    whitening = PCAWhitening(2)
    with pytest.raises(ValueError, match="1 of 50 rows"):
        whitening.partial_fit(x)
    assert torch.isfinite(whitening.mean_).all()
    torch.testing.assert_close(whitening.mean_, x[1:].double().mean(0))


def test_nonfinite_rows_in_transform_are_named():
    x = spectral_features(50, 6)
    whitening = PCAWhitening(3).fit(x)
    x[7, 1] = float("-inf")
    with pytest.raises(ValueError, match="1 of 50 rows of x contain NaN or Inf"):
        whitening.transform(x)


def test_empty_batches_change_nothing():
    x = spectral_features(200, 5)
    whitening = PCAWhitening(2)
    whitening.partial_fit(torch.empty(0, 5))
    assert whitening.n_samples_seen_ == 0 and whitening.n_features_in_ is None
    whitening.partial_fit(x[:100]).partial_fit(torch.empty(0, 5)).partial_fit(x[100:])
    torch.testing.assert_close(whitening.transform(x), PCAWhitening(2).fit(x).transform(x), rtol=0, atol=1e-5)
    assert whitening.transform(torch.empty(0, 5)).shape == (0, 2)


def test_usage_errors():
    whitening = PCAWhitening(2)
    with pytest.raises(RuntimeError, match="not fitted yet"):
        whitening.transform(torch.randn(3, 4))
    whitening.fit(torch.randn(20, 4))
    with pytest.raises(ValueError, match="expected 4 features"):
        whitening.transform(torch.randn(3, 5))
    with pytest.raises(ValueError, match="expected 4 features"):
        whitening.partial_fit(torch.randn(3, 5))
    with pytest.raises(ValueError, match="2-D"):
        whitening.transform(torch.randn(3))
    with pytest.raises(ValueError, match="float32, float16, bfloat16 or float64"):
        whitening.partial_fit(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="positive int"):
        PCAWhitening(0)
    with pytest.raises(ValueError, match="eps >= 0"):
        PCAWhitening(2, eps=-1.0)


def test_state_dict_round_trip_resumes_streaming():
    x = spectral_features(1000, 12, offset=3.0)
    uninterrupted = PCAWhitening(4, flush_rows=250)
    for batch in x.split(100):
        uninterrupted.partial_fit(batch)
    first = PCAWhitening(4, flush_rows=250)
    for batch in x[:600].split(100):
        first.partial_fit(batch)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = PCAWhitening(4, flush_rows=250).load_state_dict(torch.load(buffer))
    for batch in x[600:].split(100):
        resumed.partial_fit(batch)
    assert resumed.n_samples_seen_ == 1000
    torch.testing.assert_close(resumed.transform(x), uninterrupted.transform(x), rtol=0, atol=1e-6)
    fitted = PCAWhitening(4).load_state_dict(uninterrupted.state_dict())
    torch.testing.assert_close(fitted.components_, uninterrupted.components_)
    with pytest.raises(ValueError, match="n_components=4"):
        PCAWhitening(5).load_state_dict(uninterrupted.state_dict())


def test_fitted_attributes():
    x = spectral_features(800, 16)
    whitening = PCAWhitening(5).fit(x)
    components = whitening.components_
    assert components.shape == (5, 16) and components.dtype == torch.float32
    torch.testing.assert_close(components.double() @ components.double().T, torch.eye(5, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    assert (whitening.eigenvalues_.diff() <= 0).all()
    assert whitening.explained_variance_ is not None
    assert 0 < float(whitening.explained_variance_ratio_.sum()) <= 1.0
    torch.testing.assert_close(whitening.scale_, whitening.eigenvalues_ ** -0.5)
    largest = components.abs().argmax(1)
    assert (components[torch.arange(5), largest] > 0).all()  # the documented sign convention
    assert whitening.n_features_in_ == 16 and "n_components=5" in repr(whitening)


@pytest.mark.cuda
def test_cuda_fit_equals_cpu_fit():
    x = spectral_features(5000, 64, offset=1.5)
    cpu = PCAWhitening(16).fit(x)
    gpu = PCAWhitening(16).fit(x.cuda())
    assert gpu.mean_.device.type == "cuda"
    assert principal_angles(gpu.components_.cpu(), cpu.components_).max() < 1e-4
    torch.testing.assert_close(gpu.transform(x.cuda()).cpu(), cpu.transform(x), rtol=0, atol=1e-4)
    gpu_bf16 = PCAWhitening(16).fit(x.bfloat16().cuda())
    assert principal_angles(gpu_bf16.components_.cpu(), cpu.components_).max() < 0.05
    assert math.isfinite(float(gpu_bf16.transform(x.cuda()).sum()))
