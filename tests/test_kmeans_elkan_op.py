"""pydc::kmeans_assign_elkan, one assignment pass of bounded k-means with a lower bound per (point, centroid):
its labels are kmeans_assign's for the new centroids, every bound it leaves (the anchors less the cumulative
drift, and the per-point `second`) holds for the exact distances, the dense switch works both ways, and bad
arguments are refused with a message."""

from __future__ import annotations

import pytest
import torch

from pydc.cluster.kmeans import initial_centroids
from pydc.ops._registry import HAS_OPS
from pydc.ops.cpu_capability import LEVELS, cpu_capability_level, supported_levels

pytestmark = pytest.mark.skipif(not HAS_OPS, reason="needs the compiled pydc ops")

INF = torch.tensor(float("inf"), dtype=torch.float64)


def clustered(n, d, centres, seed):
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, d, generator=generator) * 3
    return means[torch.randint(0, centres, (n,), generator=generator)] + torch.randn(n, d, generator=generator)


class Pass:
    """The state a caller keeps between passes, as pydc.cluster.kmeans_elkan.ElkanAssigner does."""

    def __init__(self, x, k):
        self.x, self.norms = x, (x * x).sum(1)
        self.labels = torch.zeros(x.shape[0], dtype=torch.int64)
        self.anchors = torch.empty((x.shape[0], k), dtype=torch.float32)
        self.second = torch.zeros(x.shape[0], dtype=torch.float64)
        self.offsets = torch.zeros(k, dtype=torch.float64)
        self.previous = None

    def __call__(self, centroids, dense_fraction=0.5):
        if self.previous is None:
            max_drift, dense_fraction = 0.0, 0.0
        else:
            drift = (centroids.double() - self.previous.double()).norm(dim=1) * (1 + 1e-12)
            self.offsets = torch.nextafter(self.offsets + drift, INF)
            max_drift = float(drift.max())
        self.previous = centroids.clone()
        return torch.ops.pydc.kmeans_assign_elkan(self.x, centroids, self.norms, self.offsets, max_drift,
                                                  dense_fraction, self.labels, self.anchors, self.second)


def assert_bounds_hold(state, centroids):
    exact = torch.cdist(state.x.double(), centroids.double())
    bounds = state.anchors.double() - state.offsets.unsqueeze(0)
    assert bool((bounds <= exact).all()), "an anchor gives a bound above the exact distance"
    others = exact.scatter(1, state.labels.unsqueeze(1), float("inf"))
    assert bool((state.second <= others.min(1).values).all()), "second exceeds the distance to another centroid"


@pytest.mark.parametrize("d", [20, 72])
@pytest.mark.parametrize("level", LEVELS)
def test_passes_give_kmeans_assign_labels_and_valid_bounds(level, d):
    """d = 72: the scored pairs' dot products run every loop of rows_dot_centroid (its chained steps at every
    width, a leftover step, a scalar tail at AVX-512); 20 only its tails."""
    if level not in supported_levels():
        pytest.skip(f"CPU lacks {level}")
    x = clustered(n=2503, d=d, centres=30, seed=9)  # 2503: batches of 64 points and a ragged last one
    centroids = initial_centroids(x, 30, seed=1)
    generator = torch.Generator().manual_seed(4)
    state = Pass(x, 30)
    with cpu_capability_level(level):
        sparse_scores = []
        for step in range(5):  # successive passes keep the bounds valid through drift and refresh
            if step > 0:
                centroids = centroids + 0.05 * torch.randn(centroids.shape, generator=generator)
                centroids[step * 5] += 2.0  # one centroid jumps: its pairs' bounds are used up
            distances, counts = state(centroids)
            plain_labels, plain_distances = torch.ops.pydc.kmeans_assign(x, centroids, state.norms, True)
            assert torch.equal(state.labels, plain_labels)
            torch.testing.assert_close(distances, plain_distances.double(), rtol=1e-5, atol=1e-3)
            assert_bounds_hold(state, centroids)
            rows, scores, dense = counts.tolist()
            assert bool(dense) == (step == 0)  # the first pass scores everything, the others are sparse
            if dense:
                assert (rows, scores) == (x.shape[0], x.shape[0] * 30)
            else:
                sparse_scores.append(scores)
    # small moves: the bounds settle most pairs (a filter that scores everything would not pass)
    assert max(sparse_scores) < 0.5 * x.shape[0] * 30


def test_dense_fraction_switches_to_a_full_pass():
    x = clustered(n=600, d=8, centres=12, seed=2)
    centroids = initial_centroids(x, 12, seed=0)
    state = Pass(x, 12)
    state(centroids)
    moved = centroids + 0.01
    _, counts = state(moved, dense_fraction=1e-9)  # any candidate at all in the sample: dense
    assert counts.tolist()[2] == 1
    _, counts = state(moved + 0.01, dense_fraction=2.0)  # never dense
    assert counts.tolist()[2] == 0
    assert torch.equal(state.labels, torch.ops.pydc.kmeans_assign(x, moved + 0.01, None, True)[0])


def test_duplicates_and_a_nan_point_match_kmeans_assign():
    generator = torch.Generator().manual_seed(6)
    base = torch.randn(40, 6, generator=generator).round()
    x = torch.cat([base.repeat(5, 1), torch.full((1, 6), float("nan"))])
    centroids = base[:10].clone()
    centroids[3] = centroids[7]  # two equal centroids: exact ties go to the lower index
    state = Pass(x, 10)
    state(centroids)
    for step in range(3):
        centroids = centroids + 0.01 * (step + 1)
        state(centroids)
        assert torch.equal(state.labels, torch.ops.pydc.kmeans_assign(x, centroids, None, True)[0])


def test_bad_arguments_are_refused():
    x = torch.randn(20, 4)
    state = Pass(x, 3)
    centroids = torch.randn(3, 4)
    op = torch.ops.pydc.kmeans_assign_elkan
    with pytest.raises(RuntimeError, match="anchors"):
        op(x, centroids, state.norms, state.offsets, 0.0, 0.0, state.labels, torch.empty(20, 4), state.second)
    with pytest.raises(RuntimeError, match="drift_offsets"):
        op(x, centroids, state.norms, state.offsets.float(), 0.0, 0.0, state.labels, state.anchors, state.second)
    with pytest.raises(RuntimeError, match="drift_offsets >= 0"):
        op(x, centroids, state.norms, -torch.ones(3, dtype=torch.float64), 0.0, 0.5, state.labels, state.anchors,
           state.second)
    with pytest.raises(RuntimeError, match="max_drift >= 0"):
        op(x, centroids, state.norms, state.offsets, -1.0, 0.5, state.labels, state.anchors, state.second)
    state(centroids)
    bad = state.labels.clone()
    bad[4] = 3
    with pytest.raises(RuntimeError, match="labels in"):
        op(x, centroids, state.norms, state.offsets, 0.0, 0.5, bad, state.anchors, state.second)


@pytest.mark.parametrize("n,d,k", [(5, 3, 1), (37, 17, 5), (300, 1, 9), (64, 33, 64)])
def test_odd_shapes_match_plain_lloyd(n, d, k, monkeypatch):
    """Tails of every vector loop (d, k not multiples of 16), one centroid, k = N, one feature."""
    from pydc.cluster import kmeans

    monkeypatch.setenv("PYDC_KMEANS_BOUNDS", "elkan")
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n + d + k))
    init = initial_centroids(x, k, seed=0)
    for level in supported_levels():
        with cpu_capability_level(level):
            bounded = kmeans(x, k, niter=8, backend="torch", init_centroids=init, bounded=True,
                             stop_at_fixed_point=False)
            plain = kmeans(x, k, niter=8, backend="torch", init_centroids=init, bounded=False,
                           stop_at_fixed_point=False)
        assert bounded.bounds == "elkan"
        assert torch.equal(bounded.labels, plain.labels) and torch.equal(bounded.centroids, plain.centroids)
