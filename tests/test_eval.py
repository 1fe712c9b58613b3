"""pydc.eval's scores on features whose answer is known: separable blobs score high, shuffled labels low."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pydc.eval import evaluate_features, knn_accuracy


def _blobs(num_classes=4, per_class=60, dim=32, spread=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = 4 * torch.eye(num_classes, dim) + 0.5 * torch.randn(num_classes, dim, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return features, labels


def test_separable_features_score_near_one():
    features, labels = _blobs()
    scores = evaluate_features(features, labels, seed=0, knn_k=5, pca_dim=8)
    assert scores["images"] == 240 and scores["classes"] == 4 and scores["feature_dim"] == 32
    assert scores["knn_accuracy"] > 0.98
    assert scores["linear_probe_accuracy"] > 0.98
    assert scores["nmi_kmeans"] > 0.95 and scores["nmi_kmeans_l2"] > 0.95


def test_shuffled_labels_score_near_chance():
    features, labels = _blobs()
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    scores = evaluate_features(features, shuffled, seed=0, knn_k=5, pca_dim=8)
    assert scores["knn_accuracy"] < 0.5 and scores["linear_probe_accuracy"] < 0.5
    assert scores["nmi_kmeans"] < 0.15


def test_knn_majority_vote_by_cosine_similarity():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]])
    train_labels = torch.tensor([0, 0, 1, 1, 1])
    test = torch.tensor([[10.0, 1.0], [0.0, 3.0]])  # scale does not matter, direction does
    assert knn_accuracy(train, train_labels, test, torch.tensor([0, 1]), k=2) == 1.0
    assert knn_accuracy(train, train_labels, test, torch.tensor([1, 1]), k=2) == 0.5


def test_single_class_is_rejected():
    features, _ = _blobs(num_classes=1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        evaluate_features(features, np.zeros(len(features), dtype=np.int64))
