"""DeepCluster's per-epoch pieces: the feature pass, PCA-whitening + k-means, and the classifier it trains.

One epoch (Caron et al., 2018): compute features of every image in eval mode on centre crops (PCA moments are
accumulated batch by batch during that pass), whiten + L2-normalise them, run k-means on the device, then train
the backbone and a freshly initialised top layer to predict the cluster of each image, drawing images
uniformly over clusters.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from pydc.utils import dist as dist_utils


class DeepClusterModel(nn.Module):
    """Backbone + top layer Linear(feature_dim, k); the top layer is re-initialised in place every epoch.

    Re-initialising in place (instead of building a new Linear) keeps DistributedDataParallel's view of the
    parameters valid; the generator seeded by (seed, epoch) makes every rank draw the same weights.
    """

    def __init__(self, backbone: nn.Module, num_clusters: int):
        super().__init__()
        self.backbone = backbone
        self.top_layer = nn.Linear(backbone.feature_dim, num_clusters)

    def reset_top_layer(self, seed: int, epoch: int) -> None:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        with torch.no_grad():
            weight = torch.empty(self.top_layer.weight.shape).normal_(0.0, 0.01, generator=generator)
            self.top_layer.weight.copy_(weight)
            self.top_layer.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.top_layer(self.backbone(images))


@torch.no_grad()
def compute_features(feature_fn, loader, num_images: int, device: torch.device, on_batch=None,
                     progress=None) -> torch.Tensor:
    """Features of every image, in index order, on `device`, gathered from all ranks.

    `feature_fn(images) -> (B, D)` runs in eval mode; `loader` yields this rank's contiguous shard in order;
    `on_batch(features)` sees each local batch (the streamed PCA moments). The result is (num_images, D) on
    every rank.
    """
    pieces = []
    for batch in loader:
        features = feature_fn(batch.images.to(device, non_blocking=True)).float()
        if on_batch is not None:
            on_batch(features)
        pieces.append(features)
        if progress is not None:
            progress.update(1)
    local = torch.cat(pieces) if pieces else torch.empty(0, device=device)
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
    """PCA-whiten + L2 (pca already holds the streamed moments) then k-means; returns labels and timings.

    In torch.distributed only rank 0 computes; the labels are broadcast so every rank holds the same ones.
    """
    from pydc.cluster import kmeans

    timings = {}
    labels = torch.empty(features.shape[0], dtype=torch.int64, device=features.device)
    objective = float("nan")
    if dist_utils.is_main_process():
        start = time.perf_counter()
        whitened = pca.transform(features)
        _synchronize(features.device)
        timings["time_pca"] = time.perf_counter() - start
        nan_rows = int(torch.isnan(whitened).any(dim=1).sum())
        if nan_rows > max(1, features.shape[0] // 1000):
            raise FloatingPointError(f"{nan_rows} of {features.shape[0]} rows are NaN after PCA-whitening; the "
                                     f"features have collapsed (lower --lr, or check the data)")
        start = time.perf_counter()
        result = kmeans(whitened, num_clusters, niter=niter, seed=seed, backend=backend)
        _synchronize(features.device)
        timings["time_kmeans"] = time.perf_counter() - start
        labels.copy_(result.labels.to(features.device))
        if result.objective:
            objective = float(result.objective[-1])
    dist_utils.broadcast_tensor(labels, 0)
    timings["kmeans_objective"] = objective
    return labels, timings


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
