"""k-means beside its references on the same inputs: faiss-cpu's k-means and torch matmul + argmin on the CPU,
a torch k-means built on torch.cdist + argmin on CUDA.

Sizes (issue 4): CPU 100,000 x 256, k = 1000, 20 iterations; CUDA 1,280,000 x 256, k = 10000, 20 iterations
(DeepCluster on ImageNet). Inputs are L2-normalised Gaussian rows, like PCA-whitened features. Each full
k-means runs once per round, with few rounds: these are seconds-long jobs.
"""

from __future__ import annotations

import pytest
import torch

import pydc  # noqa: F401  (registers torch.ops.pydc)
from benchmarks.conftest import DEVICES, synchronized
from pydc.cluster import kmeans

NITER = 20
SIZES = {"cpu": (100_000, 256, 1000), "cuda": (1_280_000, 256, 10_000)}
REFERENCE_CHUNK_ROWS = 16_384  # rows per torch.cdist call: bounds the reference's distance matrix to 655 MB


def features(n: int, d: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((n, d), generator=generator)
    return torch.nn.functional.normalize(x, dim=1).to(device)


def torch_cdist_kmeans(x: torch.Tensor, init: torch.Tensor, niter: int) -> torch.Tensor:
    """Plain torch Lloyd iterations: chunked torch.cdist + argmin, index_add_ means (no empty-cluster split)."""
    centroids = init.clone()
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for _ in range(niter):
        for start in range(0, x.shape[0], REFERENCE_CHUNK_ROWS):
            labels[start:start + REFERENCE_CHUNK_ROWS] = torch.cdist(x[start:start + REFERENCE_CHUNK_ROWS],
                                                                     centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=centroids.shape[0]).clamp_min(1).unsqueeze(1)
        centroids = sums / counts
    return labels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["pydc", "reference"])
def test_kmeans(benchmark, device, impl):
    n, d, k = SIZES[device]
    x = features(n, d, device)
    benchmark.group = f"kmeans {device} {n}x{d} k={k} {NITER} iters"
    benchmark.extra_info["role"] = impl
    benchmark.extra_info["flop"] = 2 * n * k * d * NITER
    if impl == "pydc":
        fn = synchronized(lambda: kmeans(x, k, niter=NITER, seed=0, backend="torch").labels, device)
    elif device == "cpu":
        pytest.importorskip("faiss")
        benchmark.extra_info["reference"] = "faiss-cpu k-means"
        fn = lambda: kmeans(x, k, niter=NITER, seed=0, backend="faiss").labels  # noqa: E731
    else:
        benchmark.extra_info["reference"] = "torch.cdist + argmin k-means"
        init = x[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k].to(device)]
        fn = synchronized(lambda: torch_cdist_kmeans(x, init, NITER), device)
    labels = benchmark.pedantic(fn, rounds=2 if device == "cpu" else 1, iterations=1, warmup_rounds=0)
    assert labels.shape == (n,)


@pytest.mark.parametrize("impl", ["pydc", "reference"])
def test_assign_cpu(benchmark, impl):
    n, d, k = SIZES["cpu"]
    x = features(n, d, "cpu")
    centroids = x[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:k]].clone()
    benchmark.group = f"kmeans_assign cpu {n}x{d} k={k}"
    benchmark.extra_info["role"] = impl
    benchmark.extra_info["flop"] = 2 * n * k * d
    if impl == "pydc":
        norms = (x * x).sum(1)
        fn = lambda: torch.ops.pydc.kmeans_assign(x, centroids, norms, True)[0]  # noqa: E731
    else:
        benchmark.extra_info["reference"] = "torch matmul + argmin"
        centroid_norms = (centroids * centroids).sum(1)
        fn = lambda: (centroid_norms - 2.0 * (x @ centroids.T)).argmin(1)  # noqa: E731
    labels = benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    assert labels.shape == (n,)
