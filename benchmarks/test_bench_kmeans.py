"""k-means beside its references on the same inputs, each pair checked for agreement before it is timed.

CPU (issue 12): 100,000 x 256, k = 1000, niter = 20, on two data sets:
  clustered     1000 Gaussian centres (N(0, 3^2) per feature) plus unit Gaussian noise: what features with
                real structure look like; Lloyd reaches a fixed point early and the bounds skip most rows;
  unstructured  L2-normalised Gaussian rows (like PCA-whitened features of a random net): the worst case.
pydc (backend="torch": bounded k-means, fixed-point stop) against faiss-cpu's k-means (which stops when an
iteration leaves its objective unchanged), both from the same initial centroids; pydc's final objective must
be within 1% of faiss's (or lower) before timing.
kmeans_assign against faiss IndexFlatL2.search(x, 1) and torch matmul + argmin on the same arrays; the
labels must agree except at ties (exact float64 distances within float32 rounding) before timing.
CUDA: 1,280,000 x 256, k = 10000 against a torch.cdist k-means; bounded k-means (kmeans_yinyang_pass) against
pydc's plain CUDA Lloyd, 200,000 x 256, k = 1000, clustered.

Each full k-means runs twice per side: once untimed by pytest-benchmark for the check (its wall time is kept in
extra_info as a second sample) and once timed (seconds-long jobs on a shared machine). The ISA level is the one in
use; to measure capped at AVX2 on an AVX-512 machine run with PYDC_CPU_CAPABILITY=avx2
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 OPENBLAS_CORETYPE=Haswell FAISS_OPT_LEVEL=avx2.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import pydc  # noqa: F401  (registers torch.ops.pydc)
from benchmarks.conftest import DEVICES, pair_roles, synchronized
from pydc.cluster import kmeans
from pydc.cluster.kmeans import initial_centroids

NITER = 20
SIZES = {"cpu": (100_000, 256, 1000), "cuda": (1_280_000, 256, 10_000)}
REFERENCE_CHUNK_ROWS = 16_384  # rows per torch.cdist call: bounds the reference's distance matrix to 655 MB
DATASETS = ("clustered", "unstructured")


def features(n: int, d: int, device: str, dataset: str = "unstructured") -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if dataset == "clustered":
        centres = torch.randn((1000, d), generator=generator) * 3.0
        x = centres[torch.randint(0, 1000, (n,), generator=generator)] + torch.randn((n, d), generator=generator)
    else:
        x = torch.nn.functional.normalize(torch.randn((n, d), generator=generator), dim=1)
    return x.to(device)


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


_CHECK_SECONDS: dict[tuple[str, str], float] = {}


def result_seconds(dataset: str, impl: str) -> float:
    return _CHECK_SECONDS.get((dataset, impl), float("nan"))


def _timed(key, fn):
    start = time.perf_counter()
    result = fn()
    _CHECK_SECONDS[key] = time.perf_counter() - start
    return result


@pytest.fixture(scope="module")
def checked_cpu_pair():
    """Per data set: the features and both runs' results, after checking that the objectives agree."""
    cache = {}

    def get(dataset):
        if dataset not in cache:
            faiss = pytest.importorskip("faiss")  # noqa: F841
            n, d, k = SIZES["cpu"]
            x = features(n, d, "cpu", dataset)
            init = initial_centroids(x, k, seed=0)  # one start for both sides
            ours = _timed((dataset, "pydc"), lambda: kmeans(x, k, niter=NITER, backend="torch", init_centroids=init))
            theirs = _timed((dataset, "reference"),
                            lambda: kmeans(x, k, niter=NITER, backend="faiss", init_centroids=init))
            assert ours.objective[-1] <= theirs.objective[-1] * 1.01, (
                f"{dataset}: pydc's objective {ours.objective[-1]:.6g} is not within 1% of faiss's "
                f"{theirs.objective[-1]:.6g}")
            cache.clear()
            cache[dataset] = (x, init, ours, theirs)
        return cache[dataset]

    return get


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("impl", ["pydc", "reference"])
def test_kmeans_cpu_vs_faiss(benchmark, checked_cpu_pair, dataset, impl):
    n, d, k = SIZES["cpu"]
    x, init, ours, theirs = checked_cpu_pair(dataset)
    pair_roles(benchmark, f"kmeans cpu {dataset} {n}x{d} k={k} niter={NITER}", impl, "faiss-cpu k-means")
    result = ours if impl == "pydc" else theirs
    benchmark.extra_info.update(iterations=result.iterations, objective=result.objective[-1],
                                flop_per_iteration=2 * n * k * d)
    if impl == "pydc":
        benchmark.extra_info["fraction_of_rows_computed"] = sum(ours.rows_computed) / (n * len(ours.rows_computed))
        fn = lambda: kmeans(x, k, niter=NITER, backend="torch", init_centroids=init).labels  # noqa: E731
    else:
        fn = lambda: kmeans(x, k, niter=NITER, backend="faiss", init_centroids=init).labels  # noqa: E731
    labels = benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    if impl == "pydc":
        assert torch.equal(labels, result.labels)  # the timed run repeats the checked one (deterministic)
    benchmark.extra_info["untimed_check_run_s"] = result_seconds(dataset, impl)


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
@pytest.mark.parametrize("impl", ["pydc", "reference"])
def test_kmeans_cuda(benchmark, device, impl):
    n, d, k = SIZES[device]
    x = features(n, d, device)
    pair_roles(benchmark, f"kmeans {device} {n}x{d} k={k} {NITER} iters", impl, "torch.cdist + argmin k-means")
    benchmark.extra_info["flop"] = 2 * n * k * d * NITER
    if impl == "pydc":
        fn = synchronized(lambda: kmeans(x, k, niter=NITER, seed=0, backend="torch").labels, device)
    else:
        init = x[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k].to(device)]
        fn = synchronized(lambda: torch_cdist_kmeans(x, init, NITER), device)
    labels = benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    assert labels.shape == (n,)


BOUNDED_CUDA_SIZE = (200_000, 256, 1000)


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
@pytest.mark.parametrize("impl", ["pydc", "reference"])
def test_kmeans_cuda_bounded(benchmark, device, impl, monkeypatch):
    """Bounded k-means on CUDA (PYDC_KMEANS_BOUNDS=yinyang: kmeans_yinyang_pass, one warp per point) against
    pydc's plain CUDA Lloyd from the same start, on clustered data; records the share of scores computed."""
    n, d, k = BOUNDED_CUDA_SIZE
    x = features(n, d, device, "clustered")
    init = initial_centroids(x, k, seed=0)
    pair_roles(benchmark, f"kmeans bounded {device} clustered {n}x{d} k={k} {NITER} iters", impl,
               "pydc plain CUDA Lloyd")
    if impl == "pydc":
        monkeypatch.setenv("PYDC_KMEANS_BOUNDS", "yinyang")
    run = synchronized(lambda: kmeans(x, k, niter=NITER, backend="torch", init_centroids=init,
                                      bounded=impl == "pydc"), device)
    result = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    assert result.bounded == (impl == "pydc")
    benchmark.extra_info["iterations"] = result.iterations
    benchmark.extra_info["objective"] = result.objective[-1]
    benchmark.extra_info["fraction_of_scores_computed"] = sum(result.scores_computed) / (
        n * k * len(result.scores_computed))


def assert_labels_agree_except_ties(x, centroids, ours, theirs):
    """Labels equal, or both exact float64 distances within float32 rounding of each other (a tie)."""
    differ = torch.nonzero(ours != theirs).flatten()
    if differ.numel() == 0:
        return
    points, c = x[differ].double(), centroids.double()
    d_ours = (points - c[ours[differ]]).pow(2).sum(1)
    d_theirs = (points - c[theirs[differ]]).pow(2).sum(1)
    scale = points.pow(2).sum(1) + c.pow(2).sum(1).max()
    assert bool(((d_ours - d_theirs).abs() <= 1e-5 * scale).all()), "labels differ beyond ties"


@pytest.fixture(scope="module")
def assign_inputs():
    n, d, k = SIZES["cpu"]
    x = features(n, d, "cpu")
    centroids = x[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:k]].clone()
    norms = (x * x).sum(1)
    ours = torch.ops.pydc.kmeans_assign(x, centroids, norms, True)[0]
    centroid_norms = (centroids * centroids).sum(1)
    assert_labels_agree_except_ties(x, centroids, ours, (centroid_norms - 2.0 * (x @ centroids.T)).argmin(1))
    return x, centroids, norms, centroid_norms, ours


@pytest.mark.parametrize("reference", ["faiss", "torch"])
@pytest.mark.parametrize("impl", ["pydc", "reference"])
def test_assign_cpu(benchmark, assign_inputs, impl, reference):
    n, d, k = SIZES["cpu"]
    x, centroids, norms, centroid_norms, ours = assign_inputs
    name = "faiss IndexFlatL2.search(x, 1)" if reference == "faiss" else "torch matmul + argmin"
    pair_roles(benchmark, f"kmeans_assign cpu {n}x{d} k={k} vs {reference}", impl, name)
    benchmark.extra_info["flop"] = 2 * n * k * d
    if impl == "pydc":
        fn = lambda: torch.ops.pydc.kmeans_assign(x, centroids, norms, True)[0]  # noqa: E731
    elif reference == "faiss":
        faiss = pytest.importorskip("faiss")
        index = faiss.IndexFlatL2(d)
        index.add(np.ascontiguousarray(centroids.numpy()))
        x_np = np.ascontiguousarray(x.numpy())
        labels = torch.from_numpy(index.search(x_np, 1)[1].reshape(-1).astype(np.int64))
        assert_labels_agree_except_ties(x, centroids, ours, labels)
        fn = lambda: index.search(x_np, 1)[1]  # noqa: E731
    else:
        fn = lambda: (centroid_norms - 2.0 * (x @ centroids.T)).argmin(1)  # noqa: E731
    labels = benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    assert len(labels) == n
