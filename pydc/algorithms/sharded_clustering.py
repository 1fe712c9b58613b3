"""Clustering where the features are (`--cluster-on shard`): each rank keeps the features of its own shard of
the images, only statistics cross the network (pydc.cluster.sharded), and only the int32 labels are gathered.

- `cluster_on_shards(args, gathered_bytes, device)` resolves --cluster-on: gather | shard | auto, where auto
  shards when the run is distributed and gathering would hold more than AUTO_FRACTION of the device's memory
  on every rank (`gathered_bytes`: pydc.cluster.sharded_memory.cluster_memory(...).gathered_features).
- `StreamedPCA` feeds each local batch into PCAWhitening.partial_fit, counting rows with NaN/Inf instead of
  raising on one rank alone (a rank that raised would leave the others waiting in a collective).
- `cluster_shard(...)` all-reduces that count (every rank raises together), merges the PCA moments
  (all_reduce_pca_), whitens the local rows, runs sharded_kmeans (pydc's torch k-means: faiss cannot shard) and
  gathers the labels in global order. The feature loaders' shards are contiguous in rank order (the order
  compute_features concatenates them in), which is sharded_kmeans's default layout.
"""

from __future__ import annotations

import os
import time

import torch

from pydc.algorithms.features import synchronize
from pydc.utils import dist as dist_utils

# --cluster-on auto shards when gathering every feature would take more than this share of a device's memory:
# the rest is for the model, its activations and the allocator's slack.
AUTO_FRACTION = 0.25


def device_memory_bytes(device: torch.device) -> int:
    """The memory one rank's features live in: the GPU's, or the host's (shared by the local ranks) on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(host // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def cluster_on_shards(args, gathered_bytes: int, device: torch.device) -> bool:
    """True when this clustering should run sharded (see the module docstring for the auto rule)."""
    choice = getattr(args, "cluster_on", "gather")
    if choice == "shard":
        return True
    if choice == "gather" or not dist_utils.is_distributed():
        return False
    return gathered_bytes > AUTO_FRACTION * device_memory_bytes(device)


def gathered_feature_bytes(num_images: int, width: int, pca_dim: int, k: int, world_size: int) -> int:
    """Bytes every rank holds when the features are gathered, from the sharded accounting."""
    from pydc.cluster.sharded_memory import cluster_memory

    return cluster_memory(max(1, num_images), max(1, width), max(1, min(pca_dim, width)), max(1, k),
                          max(1, world_size)).gathered_features


class NonfiniteFeatures(ValueError):
    """Some rank's features held NaN or Inf (raised on every rank alike): the network has diverged."""


class StreamedPCA:
    """on_batch for the feature pass: the finite rows go into pca.partial_fit, the others are counted."""

    def __init__(self, pca, columns: int | None = None):
        self.pca, self.columns, self.nonfinite_rows = pca, columns, 0

    def __call__(self, batch: torch.Tensor) -> None:
        if self.columns is not None:
            batch = batch[:, : self.columns]
        finite = torch.isfinite(batch).all(dim=1)
        bad = int((~finite).sum())
        self.nonfinite_rows += bad
        kept = batch[finite] if bad else batch
        if kept.shape[0]:
            self.pca.partial_fit(kept)


def _all_reduce_count(count: int, device: torch.device) -> int:
    total = torch.tensor([count], dtype=torch.int64, device=device)
    if dist_utils.is_distributed():
        torch.distributed.all_reduce(total)
    return int(total)


def cluster_shard(local: torch.Tensor, pca, num_clusters: int, seed: int, niter: int, num_images: int, *,
                  nonfinite_rows: int = 0, spherical: bool = False) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Sharded PCA-whitening (pca: the PCAWhitening holding this rank's streamed moments, or None to cluster the
    rows as they are) + sharded k-means of this rank's (n_local, D) rows. Returns the (num_images,) int64
    labels in global order, timings as cluster_features's and the (k, d) centroids, the same on every rank.

    Raises ValueError on every rank alike: non-finite features (nonfinite_rows, summed over the ranks), NaN
    rows after whitening beyond cluster_features's tolerance, or shards that do not cover the data set.
    """
    from pydc.cluster.sharded import all_reduce_pca_, gather_labels, sharded_kmeans

    counting = local.device if not dist_utils.is_distributed() or torch.distributed.get_backend() != "nccl" \
        else torch.device("cuda", torch.cuda.current_device())
    bad = _all_reduce_count(nonfinite_rows, counting)
    if bad:
        raise NonfiniteFeatures(f"{bad} feature rows over all ranks contain NaN or Inf")
    timings = {}
    start = time.perf_counter()
    if pca is not None:
        all_reduce_pca_(pca)
        whitened = pca.transform(local) if local.shape[0] else local.new_empty((0, pca.n_components))
    else:
        whitened = local
    synchronize(local.device)
    timings["time_pca"] = time.perf_counter() - start
    nan_rows = _all_reduce_count(int(torch.isnan(whitened).any(dim=1).sum()), counting)
    if nan_rows > max(1, num_images // 1000):
        raise FloatingPointError(f"{nan_rows} of {num_images} rows are NaN after PCA-whitening; the features have "
                                 f"collapsed (lower --lr, or check the data)")
    start = time.perf_counter()
    result = sharded_kmeans(whitened, num_clusters, niter=niter, seed=seed, spherical=spherical)
    labels = gather_labels(result.labels, sizes=result.sizes)
    synchronize(local.device)
    timings["time_kmeans"] = time.perf_counter() - start
    if labels.shape[0] != num_images:
        raise RuntimeError(f"sharded clustering gathered {labels.shape[0]} labels for {num_images} images; the "
                           f"loaders' shards do not cover the data set exactly once")
    timings["kmeans_objective"] = float(result.objective[-1]) if result.objective else float("nan")
    return labels.to(torch.int64), timings, result.centroids
