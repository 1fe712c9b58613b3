"""DeepCluster's several clusterings per epoch (--dc-heads, --dc-head-k) and its top layer started as the
nearest-centroid classifier of the new clusters (--dc-head-init centroids): the pieces, then a tiny run that
is killed mid-epoch and resumed exactly."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pydc.algorithms.base import epoch_seed
from pydc.algorithms.deepcluster import (HEAD_SEED_STRIDE, DeepCluster, DeepClusterModel, head_cluster_counts,
                                         nearest_centroid_head, scale_gradient)
from pydc.algorithms.features import cluster_features
from pydc.cluster import PCAWhitening, nmi
from pydc.data.loaders import Batch
from pydc.models import build_model
from tests.test_train import TINY_FLAGS, read_log, run_cli, tiny_data  # noqa: F401 (fixture)
from tests.test_train_resume import _assert_same_state, kill_during_run


def _args(**overrides) -> argparse.Namespace:
    values = {"k": 4, "dc_heads": 3, "dc_head_k": "same", "dc_head_init": "random", "seed": 5, "pca_dim": 8,
              "kmeans_backend": "torch", "kmeans_iters": 20, "cluster_on": "gather"}
    return argparse.Namespace(**{**values, **overrides})


def test_head_cluster_counts_same_and_spread():
    assert head_cluster_counts(56, 1, "same", 1797) == [56]
    assert head_cluster_counts(56, 3, "same", 1797) == [56, 56, 56]
    assert head_cluster_counts(56, 5, "spread", 1797) == [56, 28, 112, 14, 224]
    assert head_cluster_counts(3, 3, "spread", 5) == [3, 2, 5]  # within [2, N]
    with pytest.raises(ValueError, match="expected one of same, spread"):
        head_cluster_counts(56, 2, "halves", 1797)


def test_scale_gradient_keeps_the_value_and_scales_the_gradient():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = scale_gradient(x, 3.0)
    assert torch.equal(y, x)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, 3.0 * 2 * x.detach())


def test_one_head_model_keeps_the_original_parameters():
    model = DeepClusterModel(build_model("small"), num_clusters=7)
    several = DeepClusterModel(build_model("small"), num_clusters=[7, 3, 14])
    assert set(model.state_dict()) == set(several.state_dict())
    assert model.top_layer.weight.shape == (7, 256) and several.top_layer.weight.shape == (24, 256)
    assert several.head_rows() == [slice(0, 7), slice(7, 10), slice(10, 24)]


def test_each_head_learns_from_its_own_loss_and_the_body_from_their_mean():
    """The top layer's rows of head h get the gradient of head h's cross-entropy alone (as a one-head model
    would); the body gets the mean over heads of their gradients."""
    torch.manual_seed(0)
    sizes = [4, 2, 6]
    model = DeepClusterModel(build_model("small", 16), sizes)
    model.eval()  # BatchNorm on running statistics: the same function for every forward pass below
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    targets = [torch.randint(0, size, (6,)) for size in sizes]
    algorithm = DeepCluster(_args(k=4, dc_heads=3, dc_head_k="spread"), num_images=6,
                            device=torch.device("cpu"))
    algorithm.head_sizes, algorithm.model, algorithm.labels = sizes, model, torch.stack(targets)
    batch = Batch(images=images, indices=torch.arange(6), labels=None)
    loss = algorithm.loss(model, batch)
    loss.backward()
    inputs = model.backbone(images).detach()
    losses = []
    for rows, head_targets in zip(model.head_rows(), targets):
        weight = model.top_layer.weight.detach()[rows].clone().requires_grad_(True)
        bias = model.top_layer.bias.detach()[rows].clone().requires_grad_(True)
        head_loss = F.cross_entropy(F.linear(inputs, weight, bias), head_targets)
        head_loss.backward()
        torch.testing.assert_close(model.top_layer.weight.grad[rows], weight.grad)
        torch.testing.assert_close(model.top_layer.bias.grad[rows], bias.grad)
        losses.append(head_loss.detach())
    torch.testing.assert_close(loss.detach(), torch.stack(losses).mean())
    body = model.backbone.body.classifier[0].weight
    body_grad = body.grad.clone()
    body.grad = None
    head_losses = [F.cross_entropy(F.linear(model.backbone(images), model.top_layer.weight[rows].detach(),
                                            model.top_layer.bias[rows].detach()), head_targets)
                   for rows, head_targets in zip(model.head_rows(), targets)]
    mean_loss = torch.stack(head_losses).mean()
    mean_loss.backward()
    torch.testing.assert_close(body_grad, body.grad)


def _blobs(clusters: int = 5, per_cluster: int = 40, dim: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(clusters, dim, generator=generator)
    labels = torch.arange(clusters).repeat_interleave(per_cluster)
    points = centres[labels] + torch.randn(labels.shape[0], dim, generator=generator)
    return points.double(), labels


def test_nearest_centroid_head_is_the_nearest_centroid_rule_at_the_best_scale():
    points, _ = _blobs()
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (points.shape[0],), generator=generator)  # overlapping clusters
    weight, bias, scale = nearest_centroid_head(points, labels, 6)  # cluster 5 is empty
    centroids = torch.stack([points[labels == c].mean(0) for c in range(5)])
    nearest = torch.cdist(points, centroids).argmin(1)
    logits = points.float() @ weight.T + bias
    assert torch.equal(logits[:, :5].argmax(1), nearest)
    assert torch.all(weight[5] == 0)
    torch.testing.assert_close(logits[:, :5] - logits[:, :1],  # -s/2 |x - mu_c|^2 up to a per-row term
                               (-scale / 2 * torch.cdist(points, centroids).square()).float()
                               - (-scale / 2 * torch.cdist(points, centroids[:1]).square()).float(),
                               rtol=1e-4, atol=1e-3)
    assert scale > 0

    def cross_entropy(factor):
        return float(F.cross_entropy(logits * factor, labels))
    assert cross_entropy(1.0) < min(cross_entropy(0.8), cross_entropy(1.25))


def test_nearest_centroid_head_fits_separated_clusters():
    points, labels = _blobs(seed=2)
    weight, bias, scale = nearest_centroid_head(points, labels, 5)
    logits = points.float() @ weight.T + bias
    assert torch.equal(logits.argmax(1), labels)
    assert float(F.cross_entropy(logits, labels)) < 0.05  # the fitted scale makes the head confident


def test_nearest_centroid_head_with_reduced_shards_matches_the_whole():
    """Sharded clustering: each rank's sums are reduced over the ranks; two halves summed give the whole's
    centroids (the scale is fitted per rank, so only the directions are compared)."""
    points, labels = _blobs(seed=3)
    halves = [(points[:100], labels[:100]), (points[100:], labels[100:])]
    partial = [[], []]  # each half's (sums, counts), in the order reduce sees them
    for half, (rows, half_labels) in enumerate(halves):
        nearest_centroid_head(rows, half_labels, 5, reduce=lambda tensor, half=half: partial[half].append(
            tensor.clone()))
    totals = [a + b for a, b in zip(partial[0], partial[1])]
    calls = iter(range(2))

    def reduce(tensor):
        tensor.copy_(totals[next(calls)])
    weight, _, scale = nearest_centroid_head(points[:100], labels[:100], 5, reduce=reduce)
    whole_weight, _, whole_scale = nearest_centroid_head(points, labels, 5)
    torch.testing.assert_close(weight / scale, whole_weight / whole_scale, rtol=1e-4, atol=1e-5)


def test_centroid_init_fits_every_head_to_its_own_clusters():
    """Every head's block of the top layer is nearest_centroid_head of its clusters on the ReLU'd features
    (what the head reads in training); the record reports head 0's fit."""
    sizes = [5, 3]
    algorithm = DeepCluster(_args(k=5, dc_heads=2, dc_head_init="centroids"), num_images=200,
                            device=torch.device("cpu"))
    algorithm.head_sizes, algorithm.model = sizes, DeepClusterModel(build_model("small", 16), sizes)
    points, labels = _blobs(clusters=5, dim=256, seed=4)
    features = points.float()
    coarse = labels // 2  # 3 clusters: {0, 1}, {2, 3}, {4}
    algorithm.labels = torch.stack([labels, coarse])
    record = algorithm._fit_top_layer(features, sharded=False)
    inputs = torch.relu(features)
    for rows, head_labels, size in zip(algorithm.model.head_rows(), algorithm.labels, sizes):
        weight, bias, _ = nearest_centroid_head(inputs, head_labels, size)
        torch.testing.assert_close(algorithm.model.top_layer.weight.detach()[rows], weight)
        torch.testing.assert_close(algorithm.model.top_layer.bias.detach()[rows], bias)
    assert record["head_init_scale"] > 0 and record["head_init_accuracy"] > 0.9


def test_heads_cluster_from_their_own_seeds_and_head_0_is_the_single_head_clustering():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(300, 16, generator=generator)  # no structure: k-means from another seed differs
    pca = PCAWhitening(n_components=8).fit(features)
    args = _args(k=6, dc_heads=3, dc_head_k="spread")
    algorithm = DeepCluster(args, num_images=300, device=torch.device("cpu"))
    record = algorithm._cluster(features, pca, sharded=False, nonfinite_rows=0, epoch=2)
    assert algorithm.labels.shape == (3, 300) and algorithm.labels.dtype == torch.int64
    assert [int(labels.max()) + 1 for labels in algorithm.labels] == [6, 3, 12]
    single, _ = cluster_features(features, pca, 6, epoch_seed(args.seed, 2), "torch", 20)
    assert torch.equal(algorithm.labels[0], single)
    assert record["time_kmeans"] > 0 and np.isfinite(record["kmeans_objective"])
    same = DeepCluster(_args(k=6, dc_heads=2), num_images=300, device=torch.device("cpu"))
    same._cluster(features, pca, sharded=False, nonfinite_rows=0, epoch=2)
    assert nmi(same.labels[0], same.labels[1]) < 0.99  # another seed, another partition


def test_heads_whiten_the_features_once(monkeypatch):
    """The heads cluster the same whitened features: one PCA transform an epoch, not one per head, and the
    same labels as whitening for each head."""
    features = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    pca = PCAWhitening(n_components=8).fit(features)
    expected = [cluster_features(features, pca, k, epoch_seed(5, 3) + HEAD_SEED_STRIDE * head, "torch", 20)[0]
                for head, k in enumerate([4, 2, 8])]
    calls = []
    transform = pca.transform
    monkeypatch.setattr(pca, "transform", lambda x: calls.append(x.shape) or transform(x))
    args = _args(k=4, dc_heads=3, dc_head_k="spread")
    algorithm = DeepCluster(args, num_images=200, device=torch.device("cpu"))
    record = algorithm._cluster(features, pca, sharded=False, nonfinite_rows=0, epoch=3)
    assert calls == [(200, 16)]
    assert all(torch.equal(algorithm.labels[head], expected[head]) for head in range(3))
    assert record["time_pca"] > 0


def test_state_round_trip_and_the_one_head_layout():
    algorithm = DeepCluster(_args(dc_heads=3), num_images=10, device=torch.device("cpu"))
    algorithm.labels = torch.randint(0, 4, (3, 10))
    state = algorithm.state_dict()
    assert torch.equal(state["assignments"], algorithm.labels[0])
    assert torch.equal(algorithm.assignments(), algorithm.labels[0])
    restored = DeepCluster(_args(dc_heads=3), num_images=10, device=torch.device("cpu"))
    restored.load_state_dict(state)
    assert torch.equal(restored.labels, algorithm.labels)

    one = DeepCluster(_args(dc_heads=1), num_images=10, device=torch.device("cpu"))
    one.load_state_dict({"assignments": algorithm.labels[0]})  # what a one-head run (and format 1) saved
    assert set(one.state_dict()) == {"assignments"} and torch.equal(one.assignments(), algorithm.labels[0])
    with pytest.raises(ValueError, match="assignments of 1 head"):
        restored.load_state_dict({"assignments": algorithm.labels[0]})


HEAD_FLAGS = ["--dc-heads", "2", "--dc-head-k", "spread", "--dc-head-init", "centroids"]


def test_heads_run_killed_mid_epoch_resumes_exactly(tiny_data, tmp_path):  # noqa: F811
    uninterrupted = tmp_path / "uninterrupted"
    flags = ["--data", tiny_data, "--deterministic", "--checkpoint-steps", "1", "--no-plots", *TINY_FLAGS,
             *HEAD_FLAGS]
    run_cli("pydc.train", "--output", uninterrupted, *flags)
    records = [record for record in read_log(uninterrupted) if "event" not in record]
    assert "head_init_accuracy" not in records[0]  # epoch 0 keeps the random layer
    assert all(0 <= record["head_init_accuracy"] <= 1 and record["head_init_scale"] > 0
               for record in records[1:])
    saved = torch.load(uninterrupted / "checkpoint.pt", weights_only=True)
    assert saved["model"]["top_layer.weight"].shape == (3 + 2, 256)  # k = 3 and k / 2 = 2 (rounded)
    assert saved["algorithm"]["other_head_assignments"].shape == (1, 72)

    resumed = tmp_path / "resumed"
    killed_at = kill_during_run(["--output", resumed, *flags], resumed / "checkpoint.pt", 8)  # epoch 1 of 2
    assert 6 < killed_at < 12
    run_cli("pydc.train", "--output", resumed, *flags, "--resume", "auto")
    final = torch.load(resumed / "checkpoint.pt", weights_only=True)
    for key in ("model", "optimizer", "head_optimizer", "algorithm", "assignments"):
        _assert_same_state(final[key], saved[key], key)

    result = run_cli("pydc.train", "--output", tmp_path / "other", *flags[:-6], "--resume",
                     uninterrupted / "checkpoint.pt", check=False)  # the default: one head
    assert result.returncode == 2 and "--dc-heads 2, but this run has --dc-heads 1" in result.stderr
