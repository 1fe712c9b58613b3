"""PCA-whitening fit + transform: pydc (partial_fit batch by batch, then transform) beside faiss-cpu and beside
a plain torch composition, on the same features in one run.

Each timed call does the whole job: moments (or covariance), eigen-decomposition, whitening projection and
row L2 normalization of all rows. Sizes from the issue: 50,000 x 2048 -> 256 on the CPU, 1,280,000 x 4096
-> 256 on CUDA (float32 features, TF32 GEMMs for pydc and torch alike there). Before the CPU pair against faiss
is timed, both run once and their outputs must agree (assert_same_whitening).

Capped at AVX2 on an AVX-512 machine: PYDC_CPU_CAPABILITY=avx2 (pydc's row passes) with
ATEN_CPU_CAPABILITY=avx2 (torch's elementwise kernels), MKL_ENABLE_INSTRUCTIONS=AVX2 (torch's GEMMs and eigh),
OPENBLAS_CORETYPE=Haswell (scipy's syrk and faiss's BLAS) and FAISS_OPT_LEVEL=avx2.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import DEVICES, synchronized
from pydc.cluster import PCAWhitening

SHAPES = {"cpu": (50_000, 2048, 256), "cuda": (1_280_000, 4096, 256)}
BATCH_ROWS = {"cpu": 4096, "cuda": 65536}  # rows per partial_fit call (a feature-extraction batch)
ROUNDS = {"cpu": 3, "cuda": 3}  # medians of 3: the shared CPU is noisy (+-10% between rounds)


def synthetic_features(n, d, device, seed=0):
    """Post-ReLU-like features: 256 strong decaying directions plus isotropic noise and a positive offset
    (cheap to make: one N x 256 x D product instead of a full D x D mixing)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    rank = 256
    strengths = (torch.arange(rank, device=device, dtype=torch.float32) + 1.0) ** -0.6
    latent = torch.randn(n, rank, device=device, generator=generator) * strengths
    mixing = torch.randn(rank, d, device=device, generator=generator) / rank**0.5
    x = latent @ mixing
    x += 0.05 * torch.randn(n, d, device=device, generator=generator)
    return x.add_(0.5)


@pytest.fixture(scope="module")
def features_by_device():
    cache = {}

    def get(device):
        if device not in cache:
            n, d, _ = SHAPES[device]
            cache.clear()  # one device's features at a time (21 GB on CUDA)
            cache[device] = synthetic_features(n, d, device)
        return cache[device]

    return get


def pydc_whitening(x, k, batch_rows):
    whitening = PCAWhitening(k)
    for batch in x.split(batch_rows):
        whitening.partial_fit(batch)
    return whitening.transform(x)


def torch_composition(x, k):
    """What one writes with plain torch: covariance, eigh, projection, normalization (float32)."""
    mean = x.mean(0)
    centred = x - mean
    covariance = centred.T @ centred / x.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    projection = eigenvectors[:, -k:].flip(1) * eigenvalues[-k:].flip(0).clamp_min(1e-12).rsqrt()
    y = centred @ projection
    return y / (y.norm(dim=1, keepdim=True) + 1e-10)


def faiss_whitening(x, k):
    import faiss

    pca = faiss.PCAMatrix(x.shape[1], k, -0.5)
    data = x.numpy()
    pca.train(data)
    y = pca.apply(data)
    faiss.normalize_L2(y)
    return y


def _run(benchmark, fn, device, warm_up=None):
    """Times fn; warm_up (if given) runs once first, untimed, so one-time costs (library imports, BLAS
    thread pools) stay out of the timings of every implementation alike."""
    if warm_up is not None:
        warm_up()
    benchmark.pedantic(synchronized(fn, device), rounds=ROUNDS[device], iterations=1, warmup_rounds=0)


def _small(device):
    return synthetic_features(2048, 64, device, seed=1)


def _pair(benchmark, features_by_device, device, impl, reference):
    """Names the benchmark group (pydc vs `reference`) and returns the features and k for `device`."""
    n, d, k = SHAPES[device]
    benchmark.group = f"pca_whitening {device} {n}x{d}->{k} fit+transform vs {reference}"
    benchmark.extra_info["role"] = "pydc" if impl == "pydc" else "reference"
    benchmark.extra_info["flop"] = 2 * n * d * d + 2 * n * d * k
    return features_by_device(device), k


def _run_pydc(benchmark, x, k, device):
    small = _small(device)
    _run(benchmark, lambda: pydc_whitening(x, k, BATCH_ROWS[device]), device,
         warm_up=lambda: pydc_whitening(small, 16, 512))


def assert_same_whitening(ours, theirs, rows: int = 500) -> None:
    """Both outputs describe the same whitened, normalised rows: the inner products of the first rows agree
    (they do not depend on the arbitrary sign of each component, nor on rotations inside an eigenspace)."""
    ours = torch.as_tensor(ours[:rows]).double().cpu()
    theirs = torch.as_tensor(theirs[:rows]).double().cpu()
    torch.testing.assert_close(ours @ ours.T, theirs @ theirs.T, rtol=0, atol=2e-3)


@pytest.fixture(scope="module")
def checked_against_faiss(features_by_device):
    """Runs pydc and faiss once on the CPU features and checks that they agree, before either is timed."""
    pytest.importorskip("faiss")
    n, d, k = SHAPES["cpu"]
    x = features_by_device("cpu")
    assert_same_whitening(pydc_whitening(x, k, BATCH_ROWS["cpu"]), faiss_whitening(x, k))
    return True


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["pydc", "faiss"])
def test_pca_vs_faiss(benchmark, request, features_by_device, device, impl):
    if device != "cpu":
        pytest.skip("faiss-cpu is the CPU reference")
    pytest.importorskip("faiss")  # without it the pydc half of the pair has nothing to be compared with
    request.getfixturevalue("checked_against_faiss")
    x, k = _pair(benchmark, features_by_device, device, impl, "faiss")
    if impl == "pydc":
        _run_pydc(benchmark, x, k, device)
    else:
        benchmark.extra_info["reference"] = "faiss.PCAMatrix + normalize_L2"
        small = _small(device)
        _run(benchmark, lambda: faiss_whitening(x, k), device, warm_up=lambda: faiss_whitening(small, 16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["pydc", "torch"])
def test_pca_vs_torch(benchmark, features_by_device, device, impl):
    x, k = _pair(benchmark, features_by_device, device, impl, "torch")
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = device == "cuda"  # both sides at the same GEMM precision
    try:
        if impl == "pydc":
            _run_pydc(benchmark, x, k, device)
        else:
            benchmark.extra_info["reference"] = "torch cov + eigh + matmul"
            small = _small(device)
            _run(benchmark, lambda: torch_composition(x, k), device, warm_up=lambda: torch_composition(small, 16))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
