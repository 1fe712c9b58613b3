"""DeepCluster (Caron et al., 2018) as a pydc training algorithm.

One epoch: compute features of every image in eval mode on centre crops (PCA moments are accumulated batch by
batch during that pass), whiten + L2-normalise them, run k-means on the device, then train the backbone and a
freshly initialised top layer to predict the cluster of each image, drawing images uniformly over clusters.
The top layer gets a fresh optimizer with it (`reset_head_optimizer`).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from pydc.algorithms.base import Algorithm, Loaders, TrainingError, epoch_seed
from pydc.algorithms.features import cluster_features, compute_features, diverged, local_features, progress_bar
from pydc.algorithms.sharded_clustering import (NonfiniteFeatures, StreamedPCA, cluster_on_shards, cluster_shard,
                                                gathered_feature_bytes)
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


class DeepCluster(Algorithm):
    """Per-epoch k-means over all features; the targets of an epoch are that clustering's labels."""

    name = "deepcluster"
    reset_head_optimizer = True

    def __init__(self, args, num_images: int, device: torch.device):
        super().__init__(args, num_images, device)
        self.labels: torch.Tensor | None = None  # int64 (N,) on the CPU: this epoch's targets

    def build(self, backbone):
        self.model = DeepClusterModel(backbone, self.args.k).to(self.device)
        return self.model, list(self.model.backbone.parameters()), list(self.model.top_layer.parameters())

    def begin_epoch(self, epoch: int, loaders: Loaders) -> dict:
        """Features -> PCA -> k-means -> new assignments and a fresh top layer.

        --cluster-on gather: every rank's features are gathered onto every rank, rank 0 fits PCA (streamed
        batch by batch in one process) and clusters, the labels are broadcast. shard: each rank streams its
        own shard into the PCA moments and keeps it; sharded PCA + k-means (sharded_clustering.cluster_shard);
        only the int32 labels are gathered.
        """
        from pydc.cluster import PCAWhitening

        args, model = self.args, self.model
        model.eval()
        start = time.perf_counter()
        progress = progress_bar(len(loaders.feature), f"epoch {epoch} features")
        width = model.backbone.feature_dim
        pca = PCAWhitening(n_components=min(args.pca_dim, width, self.num_images))
        sharded = cluster_on_shards(args, gathered_feature_bytes(self.num_images, width, args.pca_dim, args.k,
                                                                 dist_utils.world_size()), self.device)
        streaming = sharded or not dist_utils.is_distributed()
        stream = StreamedPCA(pca) if sharded else pca.partial_fit
        try:
            if sharded:
                features = local_features(model.backbone.features, loaders.feature, self.device, width,
                                          on_batch=stream, progress=progress)
            else:
                features = compute_features(model.backbone.features, loaders.feature, self.num_images, self.device,
                                            on_batch=stream if streaming else None, progress=progress, width=width)
            if not streaming and dist_utils.is_main_process():
                pca.fit(features)
        except ValueError as error:  # PCA refuses NaN/Inf features: the network has diverged
            raise diverged(epoch, error) from None
        progress.close()
        record = {"time_features": time.perf_counter() - start}
        seed = epoch_seed(args.seed, epoch)
        try:
            if sharded:
                labels, timings, _ = cluster_shard(features, pca, args.k, seed, args.kmeans_iters, self.num_images,
                                                   nonfinite_rows=stream.nonfinite_rows)
            else:
                labels, timings = cluster_features(features, pca, args.k, seed, args.kmeans_backend,
                                                   args.kmeans_iters)
        except NonfiniteFeatures as error:
            raise diverged(epoch, error) from None
        except ValueError as error:
            raise TrainingError(f"epoch {epoch}: clustering failed: {error}") from None
        model.reset_top_layer(args.seed, epoch)
        record.update(timings)
        self.labels = labels.cpu()
        return record

    def order(self, epoch: int, rank: int, world_size: int) -> list[int]:
        """Uniform over clusters (pydc.cluster.UniformLabelSampler)."""
        from pydc.cluster import UniformLabelSampler

        sampler = UniformLabelSampler(self.labels, self.num_images, seed=self.args.seed, epoch=epoch, rank=rank,
                                      world_size=world_size)
        return [int(i) for i in sampler]

    def loss(self, model, batch) -> torch.Tensor:
        images = batch.images
        targets = self.labels.to(images.device)[batch.indices.to(images.device)]
        return F.cross_entropy(model(images), targets)

    def assignments(self) -> torch.Tensor | None:
        return self.labels

    def state_dict(self) -> dict:
        return {"assignments": self.labels}

    def load_state_dict(self, state: dict) -> None:
        self.labels = state["assignments"]

    @classmethod
    def state_from_legacy_checkpoint(cls, saved: dict) -> dict:
        return {"assignments": saved["assignments"]}

