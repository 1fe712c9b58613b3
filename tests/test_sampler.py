"""UniformLabelSampler (DeepCluster's UnifLabelSampler rule, distributed shards), nmi and cluster_size_stats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pydc.cluster import UniformLabelSampler, cluster_size_stats, nmi
from pydc.cluster.sampler import uniform_label_indices


def skewed_labels(n: int = 1000, seed: int = 0) -> np.ndarray:
    """Clusters of very different sizes (one huge, some tiny, some ids unused)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 1, 2, 3, 5, 8], size=n, p=[0.6, 0.2, 0.1, 0.07, 0.02, 0.01])
    labels[:3] = 9  # a cluster of exactly 3 members
    return labels


def test_per_cluster_draws_follow_deepcluster_rule():
    labels = skewed_labels()
    size = labels.size
    indices = uniform_label_indices(labels, size, np.random.default_rng(0))
    assert indices.shape == (size,) and indices.dtype == np.int64
    assert indices.min() >= 0 and indices.max() < labels.size
    clusters, counts = np.unique(labels, return_counts=True)
    per_cluster = size // len(clusters) + 1           # DeepCluster: int(N / nonempty) + 1
    cut = len(clusters) * per_cluster - size          # the shuffled list is cut to N
    drawn = np.bincount(labels[indices], minlength=labels.max() + 1)[clusters]
    assert (drawn <= per_cluster).all() and (drawn >= per_cluster - cut).all()
    assert drawn.sum() == size
    for cluster, count in zip(clusters, counts):
        members = indices[labels[indices] == cluster]
        if count > per_cluster:  # without replacement: distinct members
            assert np.unique(members).size == members.size
        else:                   # with replacement: a 3-member cluster drawn ~140 times repeats members
            assert np.unique(members).size <= count < members.size


def test_cluster_of_exactly_per_cluster_size_is_drawn_with_replacement():
    # m = 2 clusters, N = 9: per_cluster = 9 // 2 + 1 = 5; cluster 0 has 5 members (replace, since 5 <= 5),
    # cluster 1 has 4. Over seeds, cluster 0's draws repeat a member at least once.
    labels = np.array([0] * 5 + [1] * 4)
    repeats = 0
    for seed in range(20):
        indices = uniform_label_indices(labels, 9, np.random.default_rng(seed))
        members = indices[labels[indices] == 0]
        repeats += np.unique(members).size < members.size
    assert repeats > 0
    big = np.array([0] * 6 + [1] * 3)  # 6 > 5: without replacement, all distinct
    for seed in range(20):
        indices = uniform_label_indices(big, 9, np.random.default_rng(seed))
        members = indices[big[indices] == 0]
        assert np.unique(members).size == members.size


def test_sampler_is_reproducible_per_seed_and_epoch():
    labels = torch.from_numpy(skewed_labels())
    first = list(UniformLabelSampler(labels, 1000, seed=3))
    assert first == list(UniformLabelSampler(labels, 1000, seed=3))
    assert first != list(UniformLabelSampler(labels, 1000, seed=4))
    sampler = UniformLabelSampler(labels, 1000, seed=3)
    sampler.set_epoch(1)
    second_epoch = list(sampler)
    assert second_epoch != first and len(second_epoch) == len(sampler) == 1000
    assert all(isinstance(i, int) for i in first[:5])


# Five clusters of a 600-sample set: m = 5, per_cluster = 600 // 5 + 1 = 121 draws each, so clusters 0 and 1
# are drawn without replacement and 2, 3, 4 with replacement; members of a cluster are not contiguous.
RANDOMNESS_SIZES = [300, 150, 100, 40, 10]


def randomness_labels() -> np.ndarray:
    labels = np.repeat(np.arange(len(RANDOMNESS_SIZES)), RANDOMNESS_SIZES)
    return np.random.default_rng(7).permutation(labels)


def member_counts(indices: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(indices, minlength=n)


def test_members_are_drawn_equally_often_over_epochs():
    # Within a cluster every member has the same chance per epoch, so over 200 epochs each member's count is
    # close to the cluster's mean: the chi-square statistic sum((count - mean)^2 / mean) is about its
    # degrees of freedom (size - 1) or less (draws without replacement vary less). The bound is 8 standard
    # deviations above: a sampler that favours some members (say the first ones of each cluster) is
    # thousands above it.
    labels = randomness_labels()
    sampler = UniformLabelSampler(labels, labels.size, seed=0)
    counts = np.zeros(labels.size, dtype=np.int64)
    for epoch in range(200):
        sampler.set_epoch(epoch)
        counts += member_counts(sampler.epoch_indices(), labels.size)
    for cluster, cluster_size in enumerate(RANDOMNESS_SIZES):
        observed = counts[labels == cluster]
        mean = observed.mean()
        chi_square = float(((observed - mean) ** 2 / mean).sum())
        degrees = cluster_size - 1
        assert chi_square < degrees + 8 * np.sqrt(2 * degrees), (cluster, chi_square, degrees)
        assert observed.min() > 0  # every member drawn at some point


def test_two_seeds_draw_different_members():
    # The same epoch under two seeds: per cluster, the members drawn (and how often) differ. Cutting the
    # 605 draws to 600 alone changes at most 2 * 5 counts, so a sampler whose draws do not depend on the
    # seed stays under 11; random draws differ by dozens (a 300-member cluster: 121 of 300 each time,
    # ~49 in common; a 10-member one: ~12 draws per member, each count differing by ~4).
    labels = randomness_labels()
    first = member_counts(UniformLabelSampler(labels, labels.size, seed=1).epoch_indices(), labels.size)
    second = member_counts(UniformLabelSampler(labels, labels.size, seed=2).epoch_indices(), labels.size)
    for cluster in range(len(RANDOMNESS_SIZES)):
        members = labels == cluster
        difference = int(np.abs(first[members] - second[members]).sum())
        assert difference > 20, (cluster, difference)


@pytest.mark.parametrize("size,world_size", [(1000, 4), (1001, 4), (7, 3), (2, 5)])
def test_rank_shards_cover_one_list(size, world_size):
    labels = skewed_labels(max(size, 20))
    samplers = [UniformLabelSampler(labels, size, seed=1, epoch=2, rank=r, world_size=world_size)
                for r in range(world_size)]
    shards = [list(s) for s in samplers]
    total = -(-size // world_size) * world_size
    assert all(len(shard) == len(s) == total // world_size for shard, s in zip(shards, samplers))
    interleaved = np.empty(total, dtype=np.int64)
    for rank, shard in enumerate(shards):
        interleaved[rank::world_size] = shard
    single = UniformLabelSampler(labels, size, seed=1, epoch=2)
    # Together the shards are the single-process list, padded cyclically to a multiple of world_size.
    assert interleaved[:size].tolist() == list(single)
    assert interleaved.tolist() == np.resize(np.array(list(single)), total).tolist()


def test_sampler_in_a_data_loader():
    labels = skewed_labels(200)
    dataset = torch.utils.data.TensorDataset(torch.arange(200))
    loader = torch.utils.data.DataLoader(dataset, batch_size=50, sampler=UniformLabelSampler(labels, 200, seed=0))
    seen = torch.cat([batch[0] for batch in loader])
    assert seen.shape == (200,)


@pytest.mark.parametrize("bad,message", [
    (dict(labels=[]), "at least one"), (dict(labels=[[0, 1]]), "1-D"), (dict(labels=[0.5, 1.0]), "integer"),
    (dict(size=0), "size"), (dict(rank=2, world_size=2), "rank"), (dict(world_size=0), "world_size"),
    (dict(seed=-1), "seed"),
])
def test_sampler_bad_arguments(bad, message):
    arguments = dict(labels=[0, 1, 1], size=3, seed=0)
    arguments.update(bad)
    with pytest.raises(ValueError, match=message):
        UniformLabelSampler(**arguments)


def test_nmi_matches_sklearn():
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(0)
    a = rng.integers(0, 10, 500)
    b = np.where(rng.random(500) < 0.7, a, rng.integers(0, 10, 500))
    expected = normalized_mutual_info_score(a, b)
    assert nmi(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-12)
    assert nmi(a.tolist(), b) == pytest.approx(expected, rel=1e-12)
    assert nmi(a, (a + 3) % 10) == pytest.approx(1.0)  # renaming clusters changes nothing
    assert 0.0 < expected < 1.0
    assert nmi(a, b, average_method="geometric") == pytest.approx(
        normalized_mutual_info_score(a, b, average_method="geometric"))
    with pytest.raises(ValueError, match="same samples"):
        nmi(a, b[:-1])


def test_cluster_size_stats():
    stats = cluster_size_stats(torch.tensor([0, 0, 0, 2, 2, 4]), k=6)
    assert stats == {"k": 6, "empty": 3, "min": 0, "max": 3, "mean": 1.0, "median": 0.5,
                     "std": pytest.approx(np.std([3, 0, 2, 0, 1, 0]))}
    with pytest.raises(ValueError, match=r"labels in \[0, k\)"):
        cluster_size_stats([0, 6], k=6)
