"""Baselines scored beside the trained networks, in the same run and by the same protocol (pydc.eval).

- raw: the 32x32x3 pixels themselves: k-means on the L2-normalised pixels (not PCA-whitened: whitening 3072
  pixel dimensions amplifies the noise components, NMI 0.44 against 0.80 on 48 digits, and costs a 3072x3072
  eigendecomposition), linear probe and k-NN on them;
- random-net: the features of the untrained backbone (its BatchNorm statistics calibrated by one train-mode
  pass over the data, as pydc's ODC does before its first clustering: an uncalibrated BN leaves the features
  nearly parallel, which would make this baseline a straw man);
- umap: UMAP (10-d, umap-learn's defaults otherwise) on the raw pixels, then k-means on the embedding with
  k = classes; only when umap-learn is installed (an optional extra: requirements/quality.txt).
Every baseline returns the keys of pydc.eval.evaluate_features (nmi_kmeans, nmi_kmeans_l2,
linear_probe_accuracy, knn_accuracy, ...) and "seconds".
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

UMAP_COMPONENTS = 10


def load_pixels(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3 * H * W) float32 pixels in [0, 1] and N labels of a class-folder dataset, in index order."""
    from PIL import Image

    from pydc.data import ImageFolderIndex

    index = ImageFolderIndex(folder)
    if index.labels is None:
        raise ValueError(f"{folder} has no class sub-folders; the quality suite needs labelled data")
    pixels = np.stack([np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).ravel() / 255.0
                       for path in index.paths])
    return pixels, np.asarray(index.labels)


def raw_pixels(pixels: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    from pydc.eval import evaluate_features

    start = time.perf_counter()
    scores = evaluate_features(torch.from_numpy(pixels), labels, seed=seed, pca_dim=None)
    return {**scores, "seconds": time.perf_counter() - start}


@torch.no_grad()
def random_network(folder: Path, arch: str, crop: int, labels: np.ndarray, seed: int, pca_dim: int,
                   batch_size: int = 64) -> dict:
    """Scores of an untrained `arch` (seeded) with BN statistics calibrated on the data."""
    from pydc.data import FeatureLoader, ImageFolderIndex
    from pydc.eval import evaluate_features
    from pydc.models import build_model

    start = time.perf_counter()
    torch.manual_seed(seed)
    backbone = build_model(arch, crop)
    loader = FeatureLoader(ImageFolderIndex(folder), crop, batch_size, device="cpu", num_threads=1)
    for module in backbone.modules():  # cumulative averages: the calibration does not depend on batch order
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    backbone.train()
    for batch in loader:
        backbone.features(batch.images)
    backbone.eval()
    features = torch.cat([backbone.features(batch.images) for batch in loader])
    scores = evaluate_features(features, labels, seed=seed, pca_dim=pca_dim)
    return {**scores, "seconds": time.perf_counter() - start}


def umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def umap_kmeans(pixels: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """UMAP of the raw pixels to 10-d, then plain k-means (k = classes, best of 5) on the embedding for NMI;
    linear probe and k-NN on the embedding by pydc.eval's protocol."""
    import umap

    from pydc.cluster import kmeans, nmi
    from pydc.eval import KMEANS_RESTARTS, evaluate_features

    start = time.perf_counter()
    embedding = umap.UMAP(n_components=UMAP_COMPONENTS, random_state=seed).fit_transform(pixels).astype(np.float32)
    scores = evaluate_features(torch.from_numpy(embedding), labels, seed=seed, pca_dim=UMAP_COMPONENTS)
    # UMAP's usual protocol clusters the embedding as it is (no whitening, no L2-normalisation).
    classes = int(np.unique(labels).size)
    runs = [kmeans(torch.from_numpy(embedding), classes, niter=50, seed=seed * KMEANS_RESTARTS + restart)
            for restart in range(KMEANS_RESTARTS)]
    best = min(runs, key=lambda run: run.objective[-1] if run.objective else float("inf"))
    scores["nmi_kmeans_plain"] = float(nmi(best.labels.cpu(), torch.as_tensor(labels)))
    return {**scores, "seconds": time.perf_counter() - start}
