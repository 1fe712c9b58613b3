"""Pieces several algorithms share: the feature pass (features of every image, gathered in order; the final
evaluation uses it too) and DeepCluster's clustering of features (PCA-whitening + k-means), which ODC's memory
initialisation reuses."""

from __future__ import annotations

import sys
import time

import torch

from pydc.algorithms.base import TrainingError
from pydc.utils import dist as dist_utils


def progress_bar(total: int, description: str):
    """A tqdm bar on rank 0 when stderr is a terminal, silent otherwise."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True,
                disable=not (sys.stderr.isatty() and dist_utils.is_main_process()))


@torch.no_grad()
def local_features(feature_fn, loader, device: torch.device, width: int, on_batch=None,
                   progress=None) -> torch.Tensor:
    """This rank's features, (n_local, width) in its shard's order (a rank with no images gets (0, width)).

    `feature_fn(images) -> (B, width)` runs in eval mode; `loader` yields this rank's contiguous shard in
    order; `on_batch(features)` sees each local batch (the streamed PCA moments).
    """
    pieces = []
    for batch in loader:
        features = feature_fn(batch.images.to(device, non_blocking=True)).float()
        if on_batch is not None:
            on_batch(features)
        pieces.append(features)
        if progress is not None:
            progress.update(1)
    return torch.cat(pieces) if pieces else torch.empty((0, width), device=device)


@torch.no_grad()
def compute_features(feature_fn, loader, num_images: int, device: torch.device, on_batch=None,
                     progress=None, width: int = 0) -> torch.Tensor:
    """Features of every image, in index order, on `device`, gathered from all ranks: local_features's rows
    of every rank concatenated in rank order, (num_images, D) on every rank."""
    local = local_features(feature_fn, loader, device, width, on_batch=on_batch, progress=progress)
    if not dist_utils.is_distributed():
        return local
    counts = torch.tensor([local.shape[0]], device=device)
    all_counts = [torch.zeros_like(counts) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(all_counts, counts)
    gathered = dist_utils.gather_rows_in_order(local, [int(c) for c in all_counts])
    if gathered.shape[0] != num_images:
        raise RuntimeError(f"feature pass gathered {gathered.shape[0]} rows for {num_images} images; the loaders' "
                           f"shards do not cover the data set exactly once")
    return gathered


def cluster_features(features: torch.Tensor, pca, num_clusters: int, seed: int, backend: str,
                     niter: int = 20) -> tuple[torch.Tensor, dict]:
    """PCA-whiten + L2 (pca already holds the streamed moments; None: the features are whitened already) then
    k-means; returns labels and timings.

    In torch.distributed only rank 0 computes; the labels are broadcast so every rank holds the same ones.
    """
    from pydc.cluster import kmeans

    timings = {}
    labels = torch.empty(features.shape[0], dtype=torch.int64, device=features.device)
    objective = float("nan")
    if dist_utils.is_main_process():
        start = time.perf_counter()
        whitened = pca.transform(features) if pca is not None else features
        synchronize(features.device)
        timings["time_pca"] = time.perf_counter() - start
        nan_rows = int(torch.isnan(whitened).any(dim=1).sum())
        if nan_rows > max(1, features.shape[0] // 1000):
            raise FloatingPointError(f"{nan_rows} of {features.shape[0]} rows are NaN after PCA-whitening; the "
                                     f"features have collapsed (lower --lr, or check the data)")
        start = time.perf_counter()
        result = kmeans(whitened, num_clusters, niter=niter, seed=seed, backend=backend)
        synchronize(features.device)
        timings["time_kmeans"] = time.perf_counter() - start
        labels.copy_(result.labels.to(features.device))
        if result.objective:
            objective = float(result.objective[-1])
    dist_utils.broadcast_tensor(labels, 0)
    timings["kmeans_objective"] = objective
    return labels, timings


def diverged(epoch: int, error: Exception):
    """The TrainingError for features that are not finite (PCA refuses them): the network has diverged."""
    return TrainingError(f"epoch {epoch}: the features are not finite ({error}); training has diverged. "
                         f"Lower --lr and resume from an earlier checkpoint")


def synchronize(device: torch.device) -> None:
    """Wait for the device, so that a timing covers the work it names."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
