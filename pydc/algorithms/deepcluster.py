"""DeepCluster (Caron et al., 2018) as a pydc training algorithm.

One epoch: compute features of every image in eval mode on centre crops (PCA moments are accumulated batch by
batch during that pass), whiten + L2-normalise them, run k-means on the device, then train the backbone and a
freshly initialised top layer to predict the cluster of each image, drawing images uniformly over clusters.
The top layer gets a fresh optimizer with it (`reset_head_optimizer`).

Two extensions, both off by default (the original's one clustering and N(0, 0.01) top layer):
- `--dc-heads H`: H clusterings of the same whitened features per epoch (k-means from H seeds; with
  `--dc-head-k spread` at k, k/2, 2k, k/4, ... clusters), one top layer each, the loss the mean of the heads'
  cross-entropies: the several prototype sets of DeepCluster-v2 and the over-clustering heads of IIC and PICA.
  The sampler stays uniform over the first clustering's clusters, which is also the one logged and saved as
  the assignments.
- `--dc-head-init centroids`: from epoch 1 on, each head starts as the nearest-centroid classifier of its
  new clusters in the space the head reads (the backbone's training output on the feature pass's centre
  crops), scaled to the least cross-entropy, instead of at chance. With the cosine schedule a random head's
  rate decays with the body's, and in the last epochs it no longer fits the new clusters within its epoch
  (README).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from pydc.algorithms.base import Algorithm, Loaders, TrainingError, epoch_seed
from pydc.algorithms.features import (cluster_features, compute_features, diverged, local_features,
                                     progress_bar, synchronize)
from pydc.algorithms.sharded_clustering import (NonfiniteFeatures, StreamedPCA, cluster_on_shards,
                                                cluster_shard, gathered_feature_bytes)
from pydc.utils import dist as dist_utils

HEAD_INIT = ("random", "centroids")
HEAD_K = ("same", "spread")
# Head h's k-means seed is the epoch's seed + h times this (a prime far above any epoch count).
HEAD_SEED_STRIDE = 104_729


def head_cluster_counts(k: int, heads: int, spread: str, num_images: int) -> list[int]:
    """The number of clusters of each head: k for every head ("same"; the heads differ by their k-means
    seeds), or ("spread") k, k/2, 2k, k/4, 4k, ... rounded, within [2, num_images], so that the heads see the
    data at several granularities. Head 0 always has k: it drives the sampler and is the run's assignments."""
    if spread not in HEAD_K:
        raise ValueError(f"head k rule {spread!r}: expected one of {', '.join(HEAD_K)}")
    counts = [k]
    for head in range(1, heads):
        exponent = (-1) ** head * ((head + 1) // 2) if spread == "spread" else 0
        counts.append(min(num_images, max(2, round(k * 2.0 ** exponent))) if exponent else k)
    return counts


def scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """`tensor` itself in the forward pass; its gradient multiplied by `factor` in the backward pass."""
    detached = tensor.detach()
    return detached + (tensor - detached) * factor


class DeepClusterModel(nn.Module):
    """Backbone + top layer; the top layer is re-initialised in place every epoch.

    With several heads (`num_clusters` a list of their k) the top layer is one Linear(feature_dim, sum of k)
    whose consecutive row blocks are the heads: one matrix product for all, and a one-head model keeps the
    original's parameters, names and shapes (its checkpoints load unchanged). Re-initialising in place
    (instead of building a new Linear) keeps DistributedDataParallel's view of the parameters valid; the
    generator seeded by (seed, epoch) makes every rank draw the same weights.
    """

    def __init__(self, backbone: nn.Module, num_clusters: int | list[int]):
        super().__init__()
        self.backbone = backbone
        self.head_sizes = [num_clusters] if isinstance(num_clusters, int) else [int(k) for k in num_clusters]
        self.top_layer = nn.Linear(backbone.feature_dim, sum(self.head_sizes))
        ends = torch.tensor(self.head_sizes).cumsum(0).tolist()
        self._head_rows = [slice(end - size, end) for end, size in zip(ends, self.head_sizes)]

    def head_rows(self) -> list[slice]:
        """Each head's rows of the top layer (its columns of the logits)."""
        return self._head_rows

    def reset_top_layer(self, seed: int, epoch: int) -> None:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        with torch.no_grad():
            weight = torch.empty(self.top_layer.weight.shape).normal_(0.0, 0.01, generator=generator)
            self.top_layer.weight.copy_(weight)
            self.top_layer.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of every head side by side, (B, sum of k); head h's are the columns head_rows()[h].

        The loss is the mean of the heads' cross-entropies, so that the body's gradient is the heads' mean;
        the top layer's gradient is scaled back up by the number of heads, so that each head learns from its
        own cross-entropy at the rate a single head would."""
        inputs = self.backbone(images)
        heads = len(self.head_sizes)
        if heads == 1:
            return self.top_layer(inputs)
        return F.linear(inputs, scale_gradient(self.top_layer.weight, heads),
                        scale_gradient(self.top_layer.bias, heads))


@torch.no_grad()
def nearest_centroid_head(inputs: torch.Tensor, labels: torch.Tensor, num_clusters: int,
                          reduce=None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(weight (k, D), bias (k,), scale): a linear layer that scores row x for cluster c by
    s ((x - m) . (mu_c - m) - |mu_c - m|^2 / 2), i.e. -s/2 |x - mu_c|^2 up to a term the same for every c:
    its arg max is the nearest centroid mu_c (the mean of the cluster's rows of `inputs`), m the mean of all
    rows.
    s minimises the mean cross-entropy of those logits against `labels` on `inputs` (a convex problem in s,
    solved by bisection on its derivative). An empty cluster gets a zero row.

    `reduce(tensor)` sums a tensor over the ranks in place when each rank holds only some rows (sharded
    clustering); the scale is then fitted to this rank's rows.
    """
    inputs = inputs.float()
    sums = inputs.new_zeros((num_clusters, inputs.shape[1])).index_add_(0, labels, inputs)
    counts = torch.bincount(labels, minlength=num_clusters).to(inputs.dtype)
    if reduce is not None:
        reduce(sums)
        reduce(counts)
    mean = sums.sum(0) / counts.sum().clamp_min(1)
    centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], mean)
    directions = centroids - mean
    bias = -(directions @ mean) - 0.5 * directions.square().sum(1)
    scores = inputs @ directions.T + bias
    scale = _cross_entropy_scale(scores, labels) if inputs.shape[0] else 1.0
    return directions * scale, bias * scale, scale


def _cross_entropy_scale(scores: torch.Tensor, labels: torch.Tensor, iterations: int = 40) -> float:
    """The s > 0 minimising mean cross-entropy(s * scores, labels); its derivative in s is
    mean(softmax(s scores) . scores - scores[label]), increasing in s."""
    target = scores.gather(1, labels[:, None]).squeeze(1)

    def slope(s: float) -> float:
        return float((torch.softmax(scores * s, dim=1) * scores).sum(1).sub(target).mean())

    spread = float(scores.std())
    if not spread > 0:
        return 1.0
    low, high = 0.0, 1.0 / spread
    while slope(high) < 0 and high < 1e6 / spread:  # separable rows: the cross-entropy falls for ever
        low, high = high, 2 * high
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if slope(middle) < 0 else (low, middle)
    return 0.5 * (low + high)


class DeepCluster(Algorithm):
    """Per-epoch k-means over all features; the targets of an epoch are that clustering's labels (one
    clustering per head, see the module docstring)."""

    name = "deepcluster"
    reset_head_optimizer = True

    def __init__(self, args, num_images: int, device: torch.device):
        super().__init__(args, num_images, device)
        self.head_sizes = head_cluster_counts(args.k, args.dc_heads, args.dc_head_k, self.num_images)
        self.labels: torch.Tensor | None = None  # int64 (heads, N) on the CPU: this epoch's targets

    def build(self, backbone):
        self.model = DeepClusterModel(backbone, self.head_sizes).to(self.device)
        return self.model, list(self.model.backbone.parameters()), list(self.model.top_layer.parameters())

    def begin_epoch(self, epoch: int, loaders: Loaders) -> dict:
        """Features -> PCA -> k-means (once per head) -> new assignments and a fresh top layer.

        --cluster-on gather: every rank's features are gathered onto every rank, rank 0 fits PCA (streamed
        batch by batch in one process) and clusters, the labels are broadcast. shard: each rank streams its
        own shard into the PCA moments and keeps it; sharded PCA + k-means (sharded_clustering.cluster_shard);
        only the int32 labels are gathered. Head h's k-means starts from its own seed; head 0's is the
        single-head run's, so that a one-head run is the original.
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
                features = compute_features(model.backbone.features, loaders.feature, self.num_images,
                                            self.device, on_batch=stream if streaming else None,
                                            progress=progress, width=width)
            if not streaming and dist_utils.is_main_process():
                pca.fit(features)
        except ValueError as error:  # PCA refuses NaN/Inf features: the network has diverged
            raise diverged(epoch, error) from None
        progress.close()
        record = {"time_features": time.perf_counter() - start}
        try:
            nonfinite_rows = stream.nonfinite_rows if sharded else 0
            record.update(self._cluster(features, pca, sharded, nonfinite_rows, epoch))
        except NonfiniteFeatures as error:
            raise diverged(epoch, error) from None
        except ValueError as error:
            raise TrainingError(f"epoch {epoch}: clustering failed: {error}") from None
        if args.dc_head_init == "centroids" and epoch > 0:
            # Not at epoch 0: the untrained network's BatchNorm running statistics are not those of its
            # training batches, so a layer fitted to the feature pass misfits them (digits: scale 2e4, epoch
            # 0's loss 145).
            record.update(self._fit_top_layer(features, sharded))
        else:
            model.reset_top_layer(args.seed, epoch)
        return record

    def _cluster(self, features: torch.Tensor, pca, sharded: bool, nonfinite_rows: int, epoch: int) -> dict:
        """k-means once per head; sets `labels` (heads, N) and returns the timings, summed over the heads."""
        args = self.args
        labels, record = [], {}
        inputs, inputs_pca, whitening_seconds = features, pca, 0.0
        if not sharded and len(self.head_sizes) > 1:  # whiten once for every head (k-means runs on rank 0)
            start = time.perf_counter()
            inputs = pca.transform(features) if dist_utils.is_main_process() else features
            inputs_pca = None
            synchronize(features.device)
            whitening_seconds = time.perf_counter() - start
        for head, num_clusters in enumerate(self.head_sizes):
            seed = epoch_seed(args.seed, epoch) + HEAD_SEED_STRIDE * head
            if not sharded:
                head_labels, timings = cluster_features(inputs, inputs_pca, num_clusters, seed,
                                                        args.kmeans_backend, args.kmeans_iters)
                if head == 0 and "time_pca" in timings:  # (rank 0's record)
                    timings["time_pca"] += whitening_seconds
            elif head == 0:
                head_labels, timings, _ = cluster_shard(features, pca, num_clusters, seed, args.kmeans_iters,
                                                        self.num_images, nonfinite_rows=nonfinite_rows)
            else:  # head 0 merged and fitted the PCA on every rank: cluster the whitened rows as they are
                whitened = (pca.transform(features) if features.shape[0]
                            else features.new_empty((0, pca.n_components)))
                head_labels, timings, _ = cluster_shard(whitened, None, num_clusters, seed, args.kmeans_iters,
                                                        self.num_images)
            labels.append(head_labels.cpu())
            record = _summed(record, timings) if head else timings
        self.labels = torch.stack(labels)
        return record

    @torch.no_grad()
    def _fit_top_layer(self, features: torch.Tensor, sharded: bool) -> dict:
        """Every head as the nearest-centroid classifier of its new clusters (nearest_centroid_head) on what
        the head reads in training (the backbone's training activation of the features); the same on every
        rank. Returns head 0's cross-entropy scale and its accuracy on the centre crops."""
        model = self.model
        inputs = model.backbone.train_activation(features)
        rows = slice(0, self.num_images)
        reduce = None
        if sharded:  # this rank's rows are its contiguous piece of the global order
            counts = dist_utils.all_gather_objects(features.shape[0])
            offset = sum(counts[:dist_utils.rank()])
            rows, reduce = slice(offset, offset + features.shape[0]), dist_utils.all_reduce_sum
        record = {}
        for head, (head_rows, num_clusters) in enumerate(zip(model.head_rows(), self.head_sizes)):
            labels = self.labels[head, rows].to(inputs.device)
            weight, bias, scale = nearest_centroid_head(inputs, labels, num_clusters, reduce=reduce)
            model.top_layer.weight[head_rows] = weight.to(model.top_layer.weight)
            model.top_layer.bias[head_rows] = bias.to(model.top_layer.bias)
            if head == 0 and inputs.shape[0]:
                predicted = (inputs @ weight.T + bias).argmax(1)
                accuracy = float((predicted == labels).float().mean())
                record = {"head_init_scale": scale, "head_init_accuracy": accuracy}
        # Sharded, each rank fitted the scale to its own rows: every rank takes rank 0's layer.
        dist_utils.broadcast_tensor(model.top_layer.weight.data, 0)
        dist_utils.broadcast_tensor(model.top_layer.bias.data, 0)
        return record

    def order(self, epoch: int, rank: int, world_size: int) -> list[int]:
        """Uniform over the first head's clusters (pydc.cluster.UniformLabelSampler)."""
        from pydc.cluster import UniformLabelSampler

        sampler = UniformLabelSampler(self.labels[0], self.num_images, seed=self.args.seed, epoch=epoch,
                                      rank=rank, world_size=world_size)
        return [int(i) for i in sampler]

    def loss(self, model, batch) -> torch.Tensor:
        """The mean over heads of the cross-entropy of the head's logits against the head's clusters."""
        images = batch.images
        targets = self.labels.to(images.device)[:, batch.indices.to(images.device)]
        logits = model(images)
        losses = [F.cross_entropy(logits[:, rows], head_targets)
                  for rows, head_targets in zip(self.model.head_rows(), targets)]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def assignments(self) -> torch.Tensor | None:
        return None if self.labels is None else self.labels[0]

    def state_dict(self) -> dict:
        """The first head's labels as "assignments" (what a one-head run saves), the others' beside them."""
        if self.labels is None:
            return {"assignments": None}
        state = {"assignments": self.labels[0]}
        if len(self.head_sizes) > 1:
            state["other_head_assignments"] = self.labels[1:]
        return state

    def load_state_dict(self, state: dict) -> None:
        first = state["assignments"]
        if first is None:
            self.labels = None
            return
        others = state.get("other_head_assignments")
        others = first.new_empty((0, first.shape[0])) if others is None else others
        if 1 + others.shape[0] != len(self.head_sizes):
            raise ValueError(f"the state holds the assignments of {1 + others.shape[0]} head(s), this run "
                             f"has --dc-heads {len(self.head_sizes)}")
        self.labels = torch.cat([first[None], others])

    @classmethod
    def state_from_legacy_checkpoint(cls, saved: dict) -> dict:
        return {"assignments": saved["assignments"]}


def _summed(record: dict, timings: dict) -> dict:
    """A later head's timings added to the earlier heads' (its k-means objective is not: head 0's is kept)."""
    return {**record, **{key: record.get(key, 0.0) + value for key, value in timings.items()
                         if key.startswith("time_")}}
