"""ODCMemory against a plain numpy memory written the MMSelfSup way (DESIGN.md, "ODC memory").

The oracle keeps the bank in numpy, relabels with a float64 matrix product, bincounts the whole label bank
for the counts and the loss weights every step, and recomputes centroids with an argsort and a loop over the
classes, as odc_memory.py does. It applies duplicate indices one after another in batch order and breaks
ties at the lowest class, the rules ODCMemory documents; its 2-means split follows the documented
deterministic rule and its random halves use a torch generator with the same seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pydc.algorithms.odc import ODCMemory
from tests.conftest import cpu_and_cuda

EPS = 1e-10


class NumpyODCMemory:
    def __init__(self, length, feat_dim, num_classes, momentum=0.5, min_cluster=20, seed=0):
        self.num_classes, self.momentum, self.min_cluster = num_classes, momentum, min_cluster
        self.feature_bank = np.zeros((length, feat_dim), dtype=np.float32)
        self.label_bank = np.zeros(length, dtype=np.int64)
        self.centroids = np.zeros((num_classes, feat_dim), dtype=np.float32)
        self.generator = torch.Generator().manual_seed(seed)

    def init_memory(self, features, labels):
        features = features.astype(np.float64)
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        self.feature_bank = (features / (norms + EPS)).astype(np.float32)
        self.label_bank = labels.astype(np.int64).copy()
        self.update_centroids()

    def counts(self):
        return np.bincount(self.label_bank, minlength=self.num_classes)

    def update_samples(self, indices, features):
        changed = 0
        centroids = self.centroids.astype(np.float64)
        for i, x in zip(indices, features.astype(np.float32).astype(np.float64)):
            f = x / (np.linalg.norm(x) + EPS)
            v = (1 - self.momentum) * self.feature_bank[i].astype(np.float64) + self.momentum * f
            self.feature_bank[i] = (v / (np.linalg.norm(v) + EPS)).astype(np.float32)
            label = int(np.argmax(centroids @ self.feature_bank[i].astype(np.float64)))
            changed += label != self.label_bank[i]
            self.label_bank[i] = label
        return changed / len(indices)

    def update_centroids(self, classes=None):
        order = np.argsort(self.label_bank, kind="stable")
        sorted_labels = self.label_bank[order]
        starts = np.searchsorted(sorted_labels, np.arange(self.num_classes), side="left")
        ends = np.searchsorted(sorted_labels, np.arange(self.num_classes), side="right")
        for k in range(self.num_classes) if classes is None else classes:
            if ends[k] > starts[k]:
                rows = self.feature_bank[order[starts[k]:ends[k]]].astype(np.float64)
                self.centroids[k] = rows.mean(axis=0).astype(np.float32)

    def loss_weights(self, power=0.5):
        histogram = self.counts().astype(np.float32)
        inverse = (1.0 / (histogram + 1e-10)) ** power
        return inverse / inverse.sum()

    def deal_with_small_clusters(self):
        histogram = self.counts()
        small = np.where(histogram < self.min_cluster)[0].tolist()
        if not small or len(small) == self.num_classes:
            return 0
        inclusion = np.setdiff1d(np.arange(self.num_classes), np.array(small), assume_unique=True)
        for s in small:
            members = np.where(self.label_bank == s)[0]
            if len(members):
                rows = self.feature_bank[members].astype(np.float64)
                similarity = self.centroids[inclusion].astype(np.float64) @ rows.T
                self.label_bank[members] = inclusion[similarity.argmax(axis=0)]
        for e in small:
            largest = int(np.bincount(self.label_bank, minlength=self.num_classes).argmax())
            members = np.where(self.label_bank == largest)[0]
            moved = members[self.split(self.feature_bank[members].astype(np.float64))]
            self.label_bank[moved] = e
            self.update_centroids([largest, e])
        return len(small)

    def split(self, points):
        """Deterministic 2-means (first row and the row farthest from it as seeds), random halves fallback."""
        first = points[0]
        second = points[np.argmax(((points - first) ** 2).sum(axis=1))]
        previous = None
        for _ in range(20):
            assignment = ((points - second) ** 2).sum(axis=1) < ((points - first) ** 2).sum(axis=1)
            if previous is not None and np.array_equal(assignment, previous):
                break
            previous = assignment
            if assignment.all() or not assignment.any():
                break
            first, second = points[~assignment].mean(axis=0), points[assignment].mean(axis=0)
        if previous.any() and not previous.all():
            return np.nonzero(previous)[0]
        permutation = torch.randperm(len(points), generator=self.generator).numpy()
        return np.sort(permutation[len(points) // 2:])


def uneven_labels(length, classes, rng):
    """Labels with a few tiny and empty classes, so that the small-cluster pass has work from the start."""
    weights = rng.uniform(0.5, 1.5, classes)
    weights[[1, 4]] = 0.0  # empty
    weights[[2, 7]] = 0.05  # small
    return rng.choice(classes, size=length, p=weights / weights.sum())


def compare(memory: ODCMemory, oracle: NumpyODCMemory):
    np.testing.assert_allclose(memory.feature_bank.cpu().numpy(), oracle.feature_bank, rtol=0, atol=2e-7)
    np.testing.assert_array_equal(memory.label_bank.cpu().numpy(), oracle.label_bank)
    np.testing.assert_array_equal(memory.counts.cpu().numpy(), oracle.counts())
    np.testing.assert_allclose(memory.centroids.cpu().numpy(), oracle.centroids, rtol=0, atol=3e-7)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_200_steps_agree_with_numpy_memory(device):
    length, dim, classes, batch = 1500, 32, 40, 64
    rng = np.random.default_rng(0)
    features = rng.standard_normal((length, dim)).astype(np.float32)
    labels = uneven_labels(length, classes, rng)
    memory = ODCMemory(length, dim, classes, momentum=0.5, min_cluster=20, device=device, seed=11)
    oracle = NumpyODCMemory(length, dim, classes, momentum=0.5, min_cluster=20, seed=11)
    memory.init_memory(torch.from_numpy(features), torch.from_numpy(labels))
    oracle.init_memory(features, labels)
    compare(memory, oracle)
    refilled = 0
    for step in range(1, 201):
        # Sampling with replacement from a narrow window now and then: batches with many duplicates.
        high = 100 if step % 7 == 0 else length
        indices = rng.integers(0, high, batch)
        batch_features = rng.standard_normal((batch, dim)).astype(np.float32) + features[indices]
        ratio = memory.update_samples(torch.from_numpy(indices), torch.from_numpy(batch_features))
        assert ratio == oracle.update_samples(indices, batch_features), f"change ratio differs at step {step}"
        if step % 10 == 0:
            memory.update_centroids()
            oracle.update_centroids()
        small = int((oracle.counts() < oracle.min_cluster).sum())
        expected = small if small < classes else 0  # all small: nothing to move members into, nothing done
        assert memory.deal_with_small_clusters() == expected, f"step {step}"
        assert oracle.deal_with_small_clusters() == expected
        refilled += expected
        weights = memory.loss_weights().cpu().numpy()
        np.testing.assert_allclose(weights, oracle.loss_weights(), rtol=1e-5, atol=0)
        if step % 50 == 0:
            compare(memory, oracle)
    compare(memory, oracle)
    assert refilled >= 4  # the run exercised the small-cluster pass, not just the sample updates


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_random_halves_when_two_means_cannot_split(device):
    # Every row of the largest class is the same vector: 2-means leaves one side empty.
    length, dim, classes = 120, 8, 4
    rng = np.random.default_rng(1)
    features = rng.standard_normal((length, dim)).astype(np.float32)
    labels = np.repeat(np.arange(classes), [60, 40, 20, 0])
    features[labels == 0] = features[0]
    memory = ODCMemory(length, dim, classes, min_cluster=10, device=device, seed=5)
    oracle = NumpyODCMemory(length, dim, classes, min_cluster=10, seed=5)
    memory.init_memory(torch.from_numpy(features), torch.from_numpy(labels))
    oracle.init_memory(features, labels)
    assert memory.deal_with_small_clusters() == 1
    oracle.deal_with_small_clusters()
    compare(memory, oracle)
    assert int(memory.counts[3]) == 30 and int(memory.counts[0]) == 30


def test_counts_and_sums_stay_exact():
    memory = ODCMemory(300, 16, 10, min_cluster=5, seed=2)
    memory.init_memory(torch.randn(300, 16), torch.randint(0, 10, (300,)))
    for _ in range(40):
        memory.update_samples(torch.randint(0, 300, (32,)), torch.randn(32, 16))
        memory.deal_with_small_clusters()
    counts, sums = memory.counts.clone(), memory.class_sums.clone()
    memory.recount()
    assert torch.equal(counts, memory.counts) and torch.equal(sums, memory.class_sums)
    assert torch.equal(counts, torch.bincount(memory.label_bank, minlength=10))


def test_state_dict_round_trip():
    memory = ODCMemory(200, 8, 6, seed=3)
    memory.init_memory(torch.randn(200, 8), torch.randint(0, 6, (200,)))
    memory.update_samples(torch.randint(0, 200, (16,)), torch.randn(16, 8))
    restored = ODCMemory(200, 8, 6, seed=99)
    restored.load_state_dict(memory.state_dict())
    for name in ("feature_bank", "label_bank", "centroids", "counts", "class_sums"):
        assert torch.equal(getattr(memory, name), getattr(restored, name))
    indices, features = torch.randint(0, 200, (16,)), torch.randn(16, 8)
    assert memory.update_samples(indices, features) == restored.update_samples(indices, features)
    assert torch.equal(memory.feature_bank, restored.feature_bank)
    with pytest.raises(ValueError, match="feature_bank has shape"):
        ODCMemory(100, 8, 6).load_state_dict(memory.state_dict())


def test_loss_weights_follow_counts():
    memory = ODCMemory(100, 4, 3)
    memory.init_memory(torch.randn(100, 4), torch.tensor([0] * 70 + [1] * 30))
    weights = memory.loss_weights(power=0.5)
    inverse = torch.tensor([70.0, 30.0, 1e-10]) ** -0.5
    torch.testing.assert_close(weights, (inverse / inverse.sum()).float())
    assert weights.dtype == torch.float32 and abs(float(weights.sum()) - 1.0) < 1e-6


def test_bad_arguments():
    with pytest.raises(ValueError, match="momentum in \\[0, 1\\]"):
        ODCMemory(10, 4, 2, momentum=2.0)
    with pytest.raises(ValueError, match="float32 or float64"):
        ODCMemory(10, 4, 2, dtype=torch.float16)
    memory = ODCMemory(10, 4, 2)
    with pytest.raises(ValueError, match="features of shape \\(10, 4\\)"):
        memory.init_memory(torch.randn(10, 5), torch.zeros(10, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels must lie in \\[0, 2\\)"):
        memory.init_memory(torch.randn(10, 4), torch.full((10,), 2))
    with pytest.raises(ValueError, match="features of shape \\(3, 4\\)"):
        memory.update_samples(torch.tensor([0, 1, 2]), torch.randn(3, 5))


@pytest.mark.filterwarnings("ignore:pydc.ops.odc")
def test_pure_torch_fallback_matches_ops(monkeypatch):
    # Without the compiled library the wrappers run the references: the memory must behave the same.
    def run():
        generator = torch.Generator().manual_seed(8)
        memory = ODCMemory(500, 16, 12, min_cluster=30, seed=4)
        memory.init_memory(torch.randn(500, 16, generator=generator),
                           torch.randint(0, 12, (500,), generator=generator))
        ratios = []
        for step in range(1, 31):
            ratios.append(memory.update_samples(torch.randint(0, 500, (40,), generator=generator),
                                                torch.randn(40, 16, generator=generator)))
            if step % 10 == 0:
                memory.update_centroids()
            memory.deal_with_small_clusters()
        return memory, ratios

    compiled, compiled_ratios = run()
    import pydc.ops.odc as odc_ops
    monkeypatch.setattr(odc_ops, "HAS_OPS", False)
    fallback, fallback_ratios = run()
    assert compiled_ratios == fallback_ratios
    torch.testing.assert_close(compiled.feature_bank, fallback.feature_bank, rtol=0, atol=2e-7)
    for name in ("label_bank", "counts"):
        assert torch.equal(getattr(compiled, name), getattr(fallback, name)), name
    torch.testing.assert_close(compiled.centroids, fallback.centroids, rtol=0, atol=1e-7)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_out_of_range_batch_is_refused_and_memory_unchanged(device):
    memory = ODCMemory(50, 8, 3, min_cluster=1, device=device)
    features = torch.randn(50, 8, device=device)
    memory.init_memory(features, torch.arange(50, device=device) % 3)
    before = {name: value.clone() for name, value in memory.state_dict().items() if torch.is_tensor(value)}
    with pytest.raises((IndexError, RuntimeError), match="indices|outside"):
        memory.update_samples(torch.tensor([3, 50], device=device), torch.randn(2, 8, device=device))
    for name, value in memory.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, before[name]), name
