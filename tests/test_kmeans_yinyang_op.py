"""pydc::kmeans_assign_yinyang, one bounded assignment pass of Yinyang k-means (global and local filter):
its labels are kmeans_assign's for the new centroids, every group bound it leaves holds for the exact
distances, and it scores fewer point-centroid pairs than a full pass when the centroids barely moved."""

from __future__ import annotations

import pytest
import torch

from pydc.cluster.kmeans import initial_centroids
from pydc.ops._registry import HAS_OPS
from pydc.ops.cpu_capability import LEVELS, cpu_capability_level, supported_levels

pytestmark = pytest.mark.skipif(not HAS_OPS, reason="needs the compiled pydc ops")

OFFSETS = torch.tensor([0, 4, 4, 13, 19, 30])  # an empty group, groups of 4 to 11 (blocks of 8 and a pair)


def clustered(n, d, centres, seed):
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, d, generator=generator) * 3
    return means[torch.randint(0, centres, (n,), generator=generator)] + torch.randn(n, d, generator=generator)


def group_drift(old, new, order, offsets):
    drift = (new.double() - old.double()).norm(dim=1) * (1 + 1e-12)
    return torch.stack([drift[order[offsets[g]:offsets[g + 1]]].max() if offsets[g + 1] > offsets[g]
                        else torch.zeros((), dtype=torch.float64) for g in range(len(offsets) - 1)])


def assert_bounds_hold(x, centroids, order, offsets, labels, lower):
    exact = torch.cdist(x.double(), centroids.double())
    for g in range(len(offsets) - 1):
        members = order[offsets[g]:offsets[g + 1]]
        if members.numel() == 0:
            assert bool(torch.isinf(lower[:, g]).all())
            continue
        others = exact[:, members].masked_fill(members.unsqueeze(0) == labels.unsqueeze(1), float("inf"))
        assert bool((lower[:, g] <= others.min(1).values).all()), f"group {g}: a lower bound exceeds a distance"


@pytest.mark.parametrize("level", LEVELS)
def test_step_gives_kmeans_assign_labels_and_valid_bounds(level):
    if level not in supported_levels():
        pytest.skip(f"CPU lacks {level}")
    x = clustered(n=2503, d=20, centres=30, seed=9)  # 2503: chunks of 128 rows and a ragged last one
    old = initial_centroids(x, 30, seed=1)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(3))
    norms = (x * x).sum(1)
    generator = torch.Generator().manual_seed(4)
    with cpu_capability_level(level):
        labels, _, _, lower = torch.ops.pydc.kmeans_assign_bounds(x, old[order], order, OFFSETS, norms)
        for step in range(3):  # successive passes keep bounds valid through decay and refresh
            new = old + 0.05 * torch.randn(old.shape, generator=generator)
            new[step * 7] += 2.0  # one centroid jumps: its group's bound decays to nothing
            drift = group_drift(old, new, order, OFFSETS)
            distances, counts = torch.ops.pydc.kmeans_assign_yinyang(x, new[order], order, OFFSETS, norms, drift,
                                                                     labels, lower)
            plain_labels, plain_distances = torch.ops.pydc.kmeans_assign(x, new, norms, True)
            assert torch.equal(labels, plain_labels)
            torch.testing.assert_close(distances, plain_distances.double(), rtol=1e-5, atol=1e-3)
            assert_bounds_hold(x, new, order, OFFSETS, labels, lower)
            rows, scores = counts.tolist()
            assert 0 < rows < x.shape[0] and 0 < scores < rows * 30  # both filters skipped work
            old = new


@pytest.mark.parametrize("level", LEVELS)
def test_centroid_separation_skips_only_farther_centroids(level):
    """Zero group bounds settle nothing, so only the centroid-separation filter (d(x, j) >= d(c, j) - d(x, c))
    can skip scores: from random labels (own centroids far from the points) and then from the right ones
    (most groups and blocks skipped), the labels are kmeans_assign's, every bound left holds, and the second
    pass scores far fewer pairs than the n x k that zero bounds alone would score."""
    if level not in supported_levels():
        pytest.skip(f"CPU lacks {level}")
    generator = torch.Generator().manual_seed(21)
    means = torch.randn(30, 20, generator=generator) * 3
    x = means[torch.randint(0, 30, (2503,), generator=generator)] + torch.randn(2503, 20, generator=generator)
    x[:45] = (means[0:30:2] + means[1:30:2]).repeat(3, 1) / 2  # midpoints: near-equidistant pairs of centroids
    centroids = means + 0.1 * torch.randn(means.shape, generator=generator)
    order = torch.randperm(30, generator=generator)
    norms = (x * x).sum(1)
    zero_drift = torch.zeros(len(OFFSETS) - 1, dtype=torch.float64)
    plain_labels, _ = torch.ops.pydc.kmeans_assign(x, centroids, norms, True)
    with cpu_capability_level(level):
        labels = torch.randint(0, 30, (x.shape[0],), generator=generator)
        for step in range(2):
            lower = torch.zeros(x.shape[0], len(OFFSETS) - 1, dtype=torch.float64)
            _, counts = torch.ops.pydc.kmeans_assign_yinyang(x, centroids[order], order, OFFSETS, norms,
                                                             zero_drift, labels, lower)
            assert torch.equal(labels, plain_labels)
            assert_bounds_hold(x, centroids, order, OFFSETS, labels, lower)
        assert counts[1] < 0.5 * x.shape[0] * 30  # the separation filter skipped most scores


@pytest.mark.parametrize("level", LEVELS)
def test_partly_skipped_group_keeps_the_bound_of_its_skipped_blocks(level):
    """A group whose nearest members to the point sit in blocks the separation filter skips, while a farther
    block of the same group is scored: its refreshed bound must be the skipped blocks' s - u, not the scored
    block's minimum. Along e1: own centroid 0, points at ~1 (u ~ 1), group 1 = two blocks at ~2.1 (2u + 0.1
    from the own centroid: skipped as a pair, 1.1 from the points) and one block at ~-1.9 (scored, 2.9 away)."""
    if level not in supported_levels():
        pytest.skip(f"CPU lacks {level}")
    generator = torch.Generator().manual_seed(5)
    d = 6
    e1 = torch.zeros(d)
    e1[0] = 1.0
    centroids = torch.cat([torch.zeros(1, d), 2.1 * e1 + 0.01 * torch.randn(16, d, generator=generator),
                           -1.9 * e1 + 0.01 * torch.randn(8, d, generator=generator)])
    x = e1 + 0.005 * torch.randn(40, d, generator=generator)
    offsets, order = torch.tensor([0, 1, 25]), torch.arange(25)
    norms = (x * x).sum(1)
    with cpu_capability_level(level):
        labels = torch.zeros(x.shape[0], dtype=torch.int64)
        lower = torch.zeros(x.shape[0], 2, dtype=torch.float64)
        _, counts = torch.ops.pydc.kmeans_assign_yinyang(x, centroids, order, offsets, norms,
                                                         torch.zeros(2, dtype=torch.float64), labels, lower)
    assert bool((labels == 0).all())
    assert counts[1] < x.shape[0] * 25  # the blocks at ~2.1 were skipped, not scored
    assert_bounds_hold(x, centroids, order, offsets, labels, lower)


@pytest.mark.parametrize("level", LEVELS)
def test_step_settles_near_ties_exactly(level):
    """Centroids within float32 noise of each other (pairs 8 apart share a block lane): every label is the
    float64 arg-min, lowest index on ties, from zero bounds (every group scored) and from fresh bounds."""
    if level not in supported_levels():
        pytest.skip(f"CPU lacks {level}")
    generator = torch.Generator().manual_seed(13)
    base = torch.randn(32, generator=generator) * 10
    centroids = base + 1e-4 * torch.randn(30, 32, generator=generator)
    centroids[8:16] = centroids[:8] + 1e-5 * torch.randn(8, 32, generator=generator)
    centroids[20] = centroids[3]  # an exact duplicate: exact ties
    x = torch.cat([base + 1e-2 * torch.randn(1000, 32, generator=generator),
                   centroids[:16].repeat(40, 1) + 1e-2 * torch.randn(640, 32, generator=generator)])
    exact = torch.cdist(x.double(), centroids.double()).pow(2)
    first_min = (exact == exact.min(1, keepdim=True).values).int().argmax(1)
    order = torch.randperm(30, generator=generator)
    norms = (x * x).sum(1)
    with cpu_capability_level(level):
        labels = torch.zeros(x.shape[0], dtype=torch.int64)
        lower = torch.zeros(x.shape[0], len(OFFSETS) - 1, dtype=torch.float64)
        zero_drift = torch.zeros(len(OFFSETS) - 1, dtype=torch.float64)
        for _ in range(2):
            torch.ops.pydc.kmeans_assign_yinyang(x, centroids[order], order, OFFSETS, norms, zero_drift, labels, lower)
            assert torch.equal(labels, first_min)


def test_bad_inputs_name_what_was_expected():
    x = torch.randn(50, 6)
    centroids = torch.randn(10, 6)
    order, offsets, norms = torch.arange(10), torch.tensor([0, 4, 10]), (x * x).sum(1)
    drift = torch.zeros(2, dtype=torch.float64)

    def call(ids=order, labels=None, lower=None, group_drift=drift):
        labels = torch.zeros(50, dtype=torch.int64) if labels is None else labels
        lower = torch.zeros(50, 2, dtype=torch.float64) if lower is None else lower
        return torch.ops.pydc.kmeans_assign_yinyang(x, centroids, ids, offsets, norms, group_drift, labels, lower)

    with pytest.raises(RuntimeError, match="permutation"):
        call(ids=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 8]))
    with pytest.raises(RuntimeError, match=r"expected labels in \[0, 10\)"):
        call(labels=torch.full((50,), 10, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"group_lower of shape \(50, 2\)"):
        call(lower=torch.zeros(50, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="group_drift"):
        call(group_drift=torch.zeros(2))


def test_fakes_of_the_bounded_ops_match_the_kernels():
    """torch.library.opcheck: schema (in-place labels/group_lower), fake tensors (shapes, dtypes) and dispatch of
    the CPU-only bounded ops agree with their kernels, so torch.compile can trace code that calls them."""
    x = clustered(n=300, d=12, centres=30, seed=2)
    centroids = initial_centroids(x, 30, seed=1)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(3))
    norms = (x * x).sum(1)
    labels, _, _, lower = torch.ops.pydc.kmeans_assign_bounds(x, centroids[order], order, OFFSETS, norms)
    drift = torch.full((len(OFFSETS) - 1,), 0.01, dtype=torch.float64)
    checks = [(torch.ops.pydc.kmeans_assign_bounds.default, (x, centroids[order], order, OFFSETS, norms)),
              (torch.ops.pydc.kmeans_label_distances.default, (x, centroids, labels)),
              (torch.ops.pydc.kmeans_assign_yinyang.default,
               (x, centroids[order], order, OFFSETS, norms, drift, labels.clone(), lower.clone()))]
    for op, arguments in checks:
        torch.library.opcheck(op, arguments, test_utils=("test_schema", "test_faketensor"))
