"""pydc.cluster.kmeans: against faiss from the same start, final labels, empty-cluster splits, small data."""

from __future__ import annotations

import importlib

import pytest
import torch

from pydc.cluster import KMeansResult, kmeans
from pydc.cluster.kmeans import SPLIT_EPS, initial_centroids, split_empty_clusters
from tests.conftest import cpu_and_cuda


def blobs(n: int, d: int, centres: int, seed: int = 0, spread: float = 1.0, device="cpu") -> torch.Tensor:
    """Gaussian blobs around random centres (more structure than noise, fewer exact ties than a grid)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn((centres, d), generator=generator, dtype=torch.float64) * 4
    members = torch.randint(0, centres, (n,), generator=generator)
    x = means[members] + spread * torch.randn((n, d), generator=generator, dtype=torch.float64)
    return x.to(device=device, dtype=torch.float32)


def assert_labels_are_nearest(result: KMeansResult, x: torch.Tensor):
    exact = torch.cdist(x.double().cpu(), result.centroids.double().cpu()).pow(2)
    chosen = exact.gather(1, result.labels.cpu().unsqueeze(1)).squeeze(1)
    scale = x.double().cpu().pow(2).sum(1) + result.centroids.double().cpu().pow(2).sum(1).max()
    assert bool((chosen - exact.min(1).values <= 1e-5 * scale + 1e-6).all())


def faiss_kmeans(faiss, x: torch.Tensor, k: int, init: torch.Tensor, niter: int = 20):
    clustering = faiss.Clustering(x.shape[1], k)
    clustering.niter = niter
    clustering.max_points_per_centroid = 10_000_000
    faiss.copy_array_to_vector(init.cpu().numpy().ravel(), clustering.centroids)
    index = faiss.IndexFlatL2(x.shape[1])
    clustering.train(x.cpu().numpy(), index)
    stats = clustering.iteration_stats
    return [stats.at(i).obj for i in range(stats.size())], clustering


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("n,d,k", [(5000, 32, 50), (3000, 16, 200)])
def test_objective_matches_faiss_from_same_start(device, n, d, k):
    faiss = pytest.importorskip("faiss")
    x = blobs(n, d, centres=4 * k, seed=k, spread=2.0)  # overlapping blobs: no empty cluster from this start
    init = initial_centroids(x, k, seed=3)
    faiss_objective, clustering = faiss_kmeans(faiss, x, k, init)
    result = kmeans(x.to(device), k, niter=20, backend="torch", init_centroids=init.to(device))
    # The fixed-point stop may end before 20 iterations: later Lloyd iterations would change nothing.
    assert len(result.objective) == result.iterations <= 20 and result.splits == 0
    # Same start, same first assignment; at the end within 1%.
    assert result.objective[0] == pytest.approx(faiss_objective[0], rel=1e-4)
    assert result.objective[-1] == pytest.approx(faiss_objective[-1], rel=0.01)
    # Without splits the two runs are the same Lloyd iterations up to float rounding.
    faiss_centroids = torch.from_numpy(faiss.vector_float_to_array(clustering.centroids).reshape(k, d))
    torch.testing.assert_close(result.centroids.cpu(), faiss_centroids, rtol=1e-3, atol=1e-3)
    assert result.centroids.shape == (k, d) and result.centroids.dtype == torch.float32
    assert result.centroids.device == x.to(device).device and result.labels.device == result.centroids.device
    assert result.labels.dtype == torch.int64 and result.labels.shape == (n,)
    assert_labels_are_nearest(result, x)


def test_objective_with_forced_empty_clusters_matches_faiss():
    faiss = pytest.importorskip("faiss")
    x = blobs(4000, 8, centres=10, seed=5)
    init = initial_centroids(x, 40, seed=0)
    init[::4] = 1000.0 + torch.arange(10, dtype=torch.float32).unsqueeze(1)  # 10 centroids nobody is near
    faiss_objective, _ = faiss_kmeans(faiss, x, 40, init)
    result = kmeans(x, 40, niter=20, backend="torch", init_centroids=init)
    assert result.splits >= 10
    assert result.objective[0] == pytest.approx(faiss_objective[0], rel=1e-4)
    assert result.objective[-1] == pytest.approx(faiss_objective[-1], rel=0.01)
    assert torch.isfinite(result.centroids).all()
    assert_labels_are_nearest(result, x)


def test_objective_decreases_and_labels_are_final_nearest():
    x = blobs(3000, 12, centres=30, seed=2)
    result = kmeans(x, 30, niter=15, seed=4, backend="torch")
    assert all(b <= a * (1 + 1e-6) for a, b in zip(result.objective, result.objective[1:]))
    assert_labels_are_nearest(result, x)


def lloyd_with_full_updates(x, k, niter, seed, init):
    """Plain Lloyd as kmeans's docstring states it, every iteration's update summing every cluster anew."""
    from pydc.ops import kmeans_assign, kmeans_update

    centroids, generator = init.clone(), torch.Generator().manual_seed(seed + 1)
    for _ in range(niter):
        labels, _ = kmeans_assign(x, centroids)
        sums, counts = kmeans_update(x, labels, k)
        centroids = torch.where((counts > 0).unsqueeze(1), sums / counts.clamp_min(1).unsqueeze(1).float(),
                                torch.zeros_like(sums))
        split_empty_clusters(centroids, counts, generator)
    return centroids, kmeans_assign(x, centroids)[0]


@pytest.mark.parametrize("empties", [False, True], ids=["regular", "with-splits"])
def test_updates_of_the_changed_clusters_only_equal_full_updates(empties):
    """kmeans sums again only the clusters some point joined or left (kmeans._update): its centroids and
    labels are those of updates that sum every cluster, bit for bit, with and without empty-cluster splits."""
    x = blobs(3000, 6, centres=25, seed=3, spread=2.0)
    init = initial_centroids(x, 30, seed=1)
    if empties:
        init[::5] = 500.0 + torch.arange(6, dtype=torch.float32).unsqueeze(1)  # nobody joins them at first
    result = kmeans(x, 30, niter=12, seed=1, backend="torch", init_centroids=init, bounded=False,
                    stop_at_fixed_point=False)
    centroids, labels = lloyd_with_full_updates(x, 30, 12, 1, init)
    assert (result.splits > 0) == empties
    assert torch.equal(result.centroids, centroids)
    assert torch.equal(result.labels, labels)


def test_split_rule_copies_and_perturbs():
    centroids = torch.tensor([[0.0, 0.0, 0.0], [2.0, 4.0, 8.0], [1.0, 1.0, 1.0]])
    counts = torch.tensor([0, 5, 1])
    original = centroids.clone()
    assert split_empty_clusters(centroids, counts, torch.Generator().manual_seed(0)) == 1
    # Only cluster 1 has size - 1 > 0, so it is split; cluster 2 (one point) never is.
    sign = torch.tensor([1.0, -1.0, 1.0])
    torch.testing.assert_close(centroids[0], original[1] * (1 + SPLIT_EPS * sign))
    torch.testing.assert_close(centroids[1], original[1] * (1 - SPLIT_EPS * sign))
    assert torch.equal(centroids[2], original[2])


@pytest.mark.parametrize("seed", range(6))
def test_split_sizes_halve_between_successive_empties(seed):
    # Eight empty clusters between eight clusters of two points. A split halves the size: the two halves of
    # a cluster of 2 have size 1 and weight size - 1 = 0, so no cluster is split twice and every cluster of
    # 2 is split exactly once, whatever the draws. Without the halving a cluster (or a copy of it) is picked
    # again with high probability (all eight distinct: 8! / 8^8 = 0.2%).
    k, d = 16, 5
    centroids = torch.randn((k, d), generator=torch.Generator().manual_seed(100 + seed))
    counts = torch.tensor([0, 2] * 8)
    original = centroids.clone()
    assert split_empty_clusters(centroids, counts, torch.Generator().manual_seed(seed)) == 8
    sign = torch.ones(d)
    sign[1::2] = -1.0
    grow, shrink = 1.0 + SPLIT_EPS * sign, 1.0 - SPLIT_EPS * sign
    sources = []
    for empty in range(0, k, 2):
        copies = [j for j in range(1, k, 2)
                  if torch.allclose(centroids[empty], original[j] * grow, rtol=1e-6, atol=0)]
        assert len(copies) == 1, f"cluster {empty} is not a once-perturbed copy of one cluster of 2"
        sources += copies
    assert sorted(sources) == list(range(1, k, 2))
    torch.testing.assert_close(centroids[1::2], original[1::2] * shrink, rtol=1e-6, atol=0)


def test_split_weights_are_sizes_minus_one_after_halving(monkeypatch):
    # Observes the sizes themselves: the weights split_empty_clusters draws from, recorded for each empty.
    # Cluster 3 (5 points) is the only one of weight > 0 for cluster 0; then its halves have size 2.5 each
    # (weight 1.5) when cluster 1 draws. (Patches torch.multinomial, which split_empty_clusters draws with.)
    recorded = []
    multinomial = torch.multinomial

    def recording_multinomial(weights, *args, **kwargs):
        recorded.append(weights.clone())
        return multinomial(weights, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", recording_multinomial)
    centroids = torch.arange(12, dtype=torch.float32).view(4, 3) + 1
    assert split_empty_clusters(centroids, torch.tensor([0, 0, 1, 5]), torch.Generator().manual_seed(1)) == 2
    assert len(recorded) == 2
    assert recorded[0].tolist() == [0.0, 0.0, 0.0, 4.0]
    assert recorded[1].tolist() == [1.5, 0.0, 0.0, 1.5]
    assert torch.equal(centroids[2], torch.tensor([7.0, 8.0, 9.0]))  # one point: never split


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_small_data(device):
    x = blobs(20, 4, centres=3, device=device)
    with pytest.raises(ValueError, match="N = 20 points for k = 21 clusters"):
        kmeans(x, 21, backend="torch")
    one = kmeans(x, 1, niter=5, backend="torch")
    torch.testing.assert_close(one.centroids[0], x.double().mean(0).float(), rtol=1e-5, atol=1e-5)
    assert one.labels.eq(0).all()
    as_many = kmeans(x, 20, niter=5, backend="torch")  # k = N: every point its own cluster
    assert sorted(as_many.labels.tolist()) == list(range(20))
    assert as_many.objective[-1] == pytest.approx(0.0, abs=1e-4)  # float32 cancellation of ||x||^2 ~ 40


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_duplicated_and_identical_points(device):
    base = blobs(30, 5, centres=3, device=device)
    duplicated = torch.cat([base, base, base])
    result = kmeans(duplicated, 10, niter=10, backend="torch")
    assert torch.isfinite(result.centroids).all()
    assert_labels_are_nearest(result, duplicated)
    identical = torch.full((50, 5), 0.5, device=device)
    same = kmeans(identical, 4, niter=10, backend="torch")
    assert torch.isfinite(same.centroids).all()
    torch.testing.assert_close(same.centroids, torch.full((4, 5), 0.5, device=device), rtol=0.01, atol=0.01)
    assert same.objective[-1] == pytest.approx(0.0, abs=1e-3)
    assert_labels_are_nearest(same, identical)


def test_spherical_centroids_have_unit_norm():
    x = torch.nn.functional.normalize(blobs(2000, 16, centres=20, seed=7), dim=1)
    result = kmeans(x, 20, niter=10, backend="torch", spherical=True)
    torch.testing.assert_close(result.centroids.norm(dim=1), torch.ones(20), rtol=1e-5, atol=1e-5)


def test_seeded_runs_repeat_bitwise_and_seeds_differ():
    x = blobs(2000, 8, centres=15, seed=9)
    first = kmeans(x, 15, niter=8, seed=11, backend="torch")
    again = kmeans(x, 15, niter=8, seed=11, backend="torch")
    assert torch.equal(first.centroids, again.centroids) and first.objective == again.objective
    assert not torch.equal(initial_centroids(x, 15, 11), initial_centroids(x, 15, 12))
    assert initial_centroids(x, 15, 11).unique(dim=0).shape[0] == 15  # distinct data points


@pytest.mark.cuda
def test_cuda_deterministic_runs_repeat_bitwise():
    x = blobs(20000, 32, centres=100, seed=3, device="cuda")
    first = kmeans(x, 100, niter=5, backend="torch", deterministic=True)
    again = kmeans(x, 100, niter=5, backend="torch", deterministic=True)
    assert torch.equal(first.centroids, again.centroids) and torch.equal(first.labels, again.labels)
    fast = kmeans(x, 100, niter=5, backend="torch", deterministic=False)
    assert fast.objective[-1] == pytest.approx(first.objective[-1], rel=0.01)


def test_faiss_and_auto_backends_on_cpu():
    pytest.importorskip("faiss")
    x = blobs(3000, 16, centres=20, seed=1)
    result = kmeans(x, 20, niter=10, backend="faiss")
    assert result.backend == "faiss-cpu" and len(result.objective) == 10
    assert result.labels.dtype == torch.int64 and result.centroids.dtype == torch.float32
    assert_labels_are_nearest(result, x)
    assert kmeans(x, 20, niter=2, backend="auto").backend == "faiss-cpu"  # 3000 x 20 x 16: below the rule
    smooth = blobs(3000, 16, centres=80, seed=1, spread=2.0)
    init = initial_centroids(smooth, 20, seed=0)
    through_faiss = kmeans(smooth, 20, niter=10, backend="faiss", init_centroids=init)
    ours = kmeans(smooth, 20, niter=10, backend="torch", init_centroids=init)
    assert ours.objective[-1] == pytest.approx(through_faiss.objective[-1], rel=0.01)


def test_auto_picks_pydc_on_the_cpu_from_the_documented_size(monkeypatch):
    """backend="auto": faiss-cpu below AUTO_PYDC_MIN_WORK multiply-adds per assignment, pydc's bounded k-means
    from there up (and faiss at any size without the compiled ops)."""
    pytest.importorskip("faiss")
    kmeans_module = importlib.import_module("pydc.cluster.kmeans")  # pydc.cluster.kmeans is also the function

    x = blobs(3000, 16, centres=20, seed=1)
    assert kmeans_module.auto_uses_faiss(x, 20)
    monkeypatch.setattr(kmeans_module, "AUTO_PYDC_MIN_WORK", 3000 * 20 * 16)
    assert kmeans_module.auto_uses_faiss(x, 20) == (not kmeans_module.bounded_assignment_available(x))
    if kmeans_module.bounded_assignment_available(x):
        assert kmeans(x, 20, niter=2, backend="auto").backend == "torch"
    assert kmeans_module.auto_uses_faiss(x, 19)  # one multiply-add row fewer: below again
    monkeypatch.setattr(kmeans_module, "bounded_assignment_available", lambda x: False)
    assert kmeans(x, 20, niter=2, backend="auto").backend == "faiss-cpu"


def test_faiss_takes_seeds_beyond_a_c_int():
    pytest.importorskip("faiss")
    x = blobs(200, 4, centres=4, seed=1)
    large = 5000 * 1_000_003  # pydc.train's epoch seed for --seed 5000
    assert torch.equal(kmeans(x, 4, niter=3, seed=large, backend="faiss").labels,
                       kmeans(x, 4, niter=3, seed=large % 2**31, backend="faiss").labels)


@pytest.mark.parametrize("bad,message", [
    (dict(k=0), "positive integer"), (dict(k=2.5), "positive integer"), (dict(niter=-1), "niter"),
    (dict(backend="sklearn"), "backend"), (dict(init_centroids=torch.zeros(3, 4)), "init_centroids"),
])
def test_bad_arguments(bad, message):
    arguments = dict(x=torch.randn(10, 4), k=2, backend="torch")
    arguments.update(bad)
    with pytest.raises(ValueError, match=message):
        kmeans(**arguments)
    with pytest.raises(ValueError, match=r"shape \(N, d\)"):
        kmeans(torch.randn(10), 2)


def test_pure_torch_fallback_gives_the_same_clustering(monkeypatch):
    import pydc.ops._registry as registry
    import pydc.ops.kmeans as kmeans_ops

    x = blobs(2000, 8, centres=40, seed=6, spread=2.0)
    with_ops = kmeans(x, 12, niter=6, seed=2, backend="torch")
    monkeypatch.setattr(kmeans_ops, "HAS_OPS", False)
    monkeypatch.setattr(registry, "_warned", set())  # the warning is issued once per process
    with pytest.warns(RuntimeWarning, match="pure-torch reference"):
        fallback = kmeans(x, 12, niter=6, seed=2, backend="torch")
    assert fallback.objective == pytest.approx(with_ops.objective, rel=1e-5)
    torch.testing.assert_close(fallback.centroids, with_ops.centroids, rtol=1e-4, atol=1e-4)
