"""PNG plots of a run: loss and NMI curves, the cluster-size histogram, an exemplar grid per cluster.

matplotlib runs with the Agg backend (no display needed); every function writes one file and returns its path.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _numbers(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    epochs, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)):
            epochs.append(record["epoch"])
            values.append(float(value))
    return epochs, values


def plot_curves(records: list[dict], path: str | os.PathLike) -> Path:
    """Training loss and NMI (against the previous epoch and, when known, the labels) per epoch."""
    figure, (loss_axis, nmi_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(*_numbers(records, "loss"), marker="o")
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, label in (("nmi_prev", "NMI vs previous epoch"), ("nmi_labels", "NMI vs labels")):
        epochs, values = _numbers(records, key)
        if values:
            nmi_axis.plot(epochs, values, marker="o", label=label)
    nmi_axis.set(xlabel="epoch", ylabel="NMI", title="cluster agreement", ylim=(0, 1))
    nmi_axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return Path(path)


def plot_cluster_sizes(labels: np.ndarray, num_clusters: int, path: str | os.PathLike) -> Path:
    sizes = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_clusters)
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.hist(sizes, bins=min(50, max(10, num_clusters // 4)))
    axis.set(xlabel="cluster size (images)", ylabel="clusters",
             title=f"{num_clusters} clusters, {int((sizes == 0).sum())} empty")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return Path(path)


def plot_exemplars(images_of_cluster: list[torch.Tensor], cluster_ids: list[int], cluster_sizes: list[int],
                   path: str | os.PathLike) -> Path:
    """One row per cluster: `images_of_cluster[r]` is a uint8 (n, 3, H, W) tensor of that cluster's images."""
    rows = len(images_of_cluster)
    columns = max((len(images) for images in images_of_cluster), default=1)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.0, rows * 1.1), squeeze=False)
    for row, images in enumerate(images_of_cluster):
        for column in range(columns):
            axis = axes[row][column]
            axis.axis("off")
            if column < len(images):
                axis.imshow(images[column].permute(1, 2, 0).cpu().numpy())
        axes[row][0].set_title(f"cluster {cluster_ids[row]} ({cluster_sizes[row]})", fontsize=7, loc="left")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return Path(path)
