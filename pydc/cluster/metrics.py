"""Clustering health: NMI between two labelings (scikit-learn underneath) and cluster size statistics."""

from __future__ import annotations

import numpy as np
import torch


def _as_label_array(name: str, labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of labels, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name}: expected integer labels, got dtype {array.dtype}")
    return array


def nmi(a, b, average_method: str = "arithmetic") -> float:
    """Normalized mutual information of two labelings of the same samples (tensors, arrays or lists).

    sklearn.metrics.normalized_mutual_info_score; DeepCluster logs it between successive epochs' labels.
    """
    from sklearn.metrics import normalized_mutual_info_score

    first, second = _as_label_array("nmi", a), _as_label_array("nmi", b)
    if first.shape != second.shape:
        raise ValueError(f"nmi: expected two labelings of the same samples, got {first.shape[0]} and "
                         f"{second.shape[0]} labels")
    return float(normalized_mutual_info_score(first, second, average_method=average_method))


def cluster_size_stats(labels, k: int) -> dict:
    """Sizes of the k clusters: empty (how many have no member), min, max, mean, median, std of the sizes."""
    array = _as_label_array("cluster_size_stats", labels)
    if int(k) != k or k < 1:
        raise ValueError(f"cluster_size_stats: expected k >= 1, got {k!r}")
    if array.size and (array.min() < 0 or array.max() >= k):
        raise ValueError(f"cluster_size_stats: expected labels in [0, k) = [0, {k}), got values in "
                         f"[{array.min()}, {array.max()}]")
    sizes = np.bincount(array.astype(np.int64), minlength=int(k))
    return {
        "k": int(k),
        "empty": int((sizes == 0).sum()),
        "min": int(sizes.min()),
        "max": int(sizes.max()),
        "mean": float(sizes.mean()),
        "median": float(np.median(sizes)),
        "std": float(sizes.std()),
    }
