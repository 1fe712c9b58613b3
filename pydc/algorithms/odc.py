"""Online Deep Clustering (Zhan et al., 2020) as a pydc training algorithm.

The network (odc_model.py) is backbone -> neck (256-d features) -> head (k logits); the memory
(odc_memory.py) holds every image's L2-normalised neck feature and label. The first epoch initialises the
memory from one clustering (`--odc-init`); from then on no epoch clusters: every step trains on the
memory's labels (cross-entropy weighted by inverse square-root cluster sizes), then blends the batch's
features into the memory and relabels those rows, recomputes the centroids every --odc-centroid-interval
steps and dissolves the clusters smaller than --odc-min-cluster. The epoch visits the images in a seeded
shuffle.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from pydc.algorithms.base import Algorithm, Loaders, TrainingError, epoch_seed, shuffled_shard
from pydc.algorithms.features import cluster_features, compute_features, diverged, local_features, progress_bar
from pydc.algorithms.odc_memory import ODCMemory
from pydc.algorithms.odc_model import ODCModel
from pydc.algorithms.sharded_clustering import (NonfiniteFeatures, StreamedPCA, cluster_on_shards, cluster_shard,
                                                gathered_feature_bytes)
from pydc.utils import dist as dist_utils

__all__ = ["ODC", "ODCMemory", "ODCModel"]


class ODC(Algorithm):
    name = "odc"

    def __init__(self, args, num_images: int, device: torch.device):
        super().__init__(args, num_images, device)
        self.memory: ODCMemory | None = None
        self._step_features: torch.Tensor | None = None  # the last batch's neck features and indices,
        self._step_indices: torch.Tensor | None = None    # from `loss` to `after_step`

    def build(self, backbone):
        self.model = ODCModel(backbone, self.args.k, dropout=self.args.odc_dropout,
                              init=self.args.odc_linear_init).to(self.device)
        self.memory = ODCMemory(self.num_images, self.model.feature_dim, self.args.k, momentum=self.args.odc_momentum,
                                min_cluster=self.args.odc_min_cluster, device=self.device)
        body = list(self.model.backbone.parameters()) + list(self.model.neck.parameters())
        return self.model, body, list(self.model.head.parameters())

    # --- the first epoch: memory initialisation -----------------------------------------------------------------
    def begin_epoch(self, epoch: int, loaders: Loaders) -> dict:
        """Epoch 0 initialises the memory with the L2-normalised neck features and the labels of one k-means
        (over the PCA-whitened backbone features with --odc-init pca, DeepCluster's clustering; over the neck
        features themselves with --odc-init neck, MMSelfSup's); later epochs keep the memory."""
        from pydc.cluster import PCAWhitening

        if epoch > 0:
            return {}
        args, model = self.args, self.model
        model.eval()
        start = time.perf_counter()  # time_features includes the BN calibration pass
        _calibrate_batch_norm(model, loaders.feature, self.device)
        progress = progress_bar(len(loaders.feature), f"epoch {epoch} features")
        width, neck_width = model.backbone.feature_dim, model.feature_dim
        pca_init = args.odc_init == "pca"
        gathered = gathered_feature_bytes(self.num_images, width + neck_width if pca_init else neck_width,
                                          args.pca_dim, args.k, dist_utils.world_size())
        if cluster_on_shards(args, gathered, self.device):
            return self._init_memory_sharded(epoch, loaders, progress, start)
        if pca_init:
            # The neck features come from the same pass, behind the backbone's.
            pca = PCAWhitening(n_components=min(args.pca_dim, width, self.num_images))
            streaming = not dist_utils.is_distributed()
            try:
                features = compute_features(_BackboneAndNeck(model), loaders.feature, self.num_images, self.device,
                                            on_batch=(lambda batch: pca.partial_fit(batch[:, :width])) if streaming
                                            else None, progress=progress, width=width + neck_width)
                features, neck_features = features[:, :width], features[:, width:]
                if not streaming and dist_utils.is_main_process():
                    pca.fit(features)
            except ValueError as error:  # PCA refuses NaN/Inf features: the network has diverged
                raise diverged(epoch, error) from None
        else:
            pca = _Identity()
            features = neck_features = F.normalize(compute_features(model.embed, loaders.feature, self.num_images,
                                                                    self.device, progress=progress,
                                                                    width=neck_width), dim=1)
        progress.close()
        record = {"time_features": time.perf_counter() - start}
        try:
            labels, timings = cluster_features(features, pca, args.k, epoch_seed(args.seed, epoch),
                                               args.kmeans_backend, args.kmeans_iters)
        except ValueError as error:
            raise TrainingError(f"epoch {epoch}: clustering failed: {error}") from None
        self.memory.init_memory(neck_features, labels.to(self.device))
        record.update(timings)
        return record

    def _init_memory_sharded(self, epoch: int, loaders: Loaders, progress, start: float) -> dict:
        """--cluster-on shard: the same clustering, each rank keeping its shard (sharded PCA-whitening of the
        backbone features with --odc-init pca, or the L2-normalised neck features with neck) and sharded
        k-means. The memory holds every image's neck feature on every rank, so those (256-d) are gathered
        anyway; the backbone features (2048-d on a ResNet-50), the larger part, never are."""
        from pydc.cluster import PCAWhitening

        args, model = self.args, self.model
        width, neck_width = model.backbone.feature_dim, model.feature_dim
        pca, stream = None, None
        if args.odc_init == "pca":
            pca = PCAWhitening(n_components=min(args.pca_dim, width, self.num_images))
            stream = StreamedPCA(pca, columns=width)
            local = local_features(_BackboneAndNeck(model), loaders.feature, self.device, width + neck_width,
                                   on_batch=stream, progress=progress)
            features, neck_local = local[:, :width], local[:, width:]  # init_memory L2-normalises
        else:
            neck_local = features = F.normalize(local_features(model.embed, loaders.feature, self.device, neck_width,
                                                               progress=progress), dim=1)
        progress.close()
        neck_features = dist_utils.all_gather_rows(neck_local)
        record = {"time_features": time.perf_counter() - start}
        try:
            nonfinite = stream.nonfinite_rows if stream is not None else int((~torch.isfinite(features)).any(1).sum())
            labels, timings, _ = cluster_shard(features, pca, args.k, epoch_seed(args.seed, epoch), args.kmeans_iters,
                                               self.num_images, nonfinite_rows=nonfinite)
        except NonfiniteFeatures as error:
            raise diverged(epoch, error) from None
        except ValueError as error:
            raise TrainingError(f"epoch {epoch}: clustering failed: {error}") from None
        self.memory.init_memory(neck_features, labels.to(self.device))
        record.update(timings)
        return record

    def order(self, epoch: int, rank: int, world_size: int) -> list[int]:
        """A seeded shuffle of every image."""
        return shuffled_shard(self.num_images, self.args.seed, epoch, rank, world_size)

    # --- per step ---------------------------------------------------------------------------------------------
    def loss(self, model, batch) -> torch.Tensor:
        images = batch.images
        indices = batch.indices.to(images.device)
        features, logits = model(images)
        memory = self.memory
        targets = memory.label_bank[indices.to(memory.label_bank.device)].to(images.device)
        self._step_features, self._step_indices = features.detach(), indices
        return F.cross_entropy(logits, targets, weight=memory.loss_weights().to(logits.device))

    def after_step(self, global_step: int) -> dict:
        """Memory update with the batch's features, centroids every --odc-centroid-interval steps, small clusters."""
        change_ratio = float(self.memory.update_samples(self._step_indices, self._step_features))
        self._step_features = self._step_indices = None
        if global_step % self.args.odc_centroid_interval == 0:
            self.memory.update_centroids()
        refilled = self.memory.deal_with_small_clusters()
        return {"change_ratio_sum": change_ratio, "clusters_refilled": refilled}

    def epoch_record(self, totals: dict) -> dict:
        """change_ratio: the mean fraction of a batch's rows whose label changed in the memory update;
        clusters_refilled: how many small clusters the epoch dissolved and refilled by splitting a large one."""
        return {"change_ratio": totals.get("change_ratio_sum", 0.0) / max(1, totals.get("steps", 0)),
                "clusters_refilled": int(totals.get("clusters_refilled", 0))}

    # --- state ------------------------------------------------------------------------------------------------
    def assignments(self) -> torch.Tensor:
        return self.memory.label_bank.detach().clone().cpu()

    def state_dict(self) -> dict:
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict({key: value.to(self.device) if torch.is_tensor(value) else value
                                     for key, value in state["memory"].items()})

    @classmethod
    def state_from_legacy_checkpoint(cls, saved: dict) -> dict:
        if saved.get("memory") is None:
            raise ValueError("the checkpoint holds no ODC memory")
        return {"memory": saved["memory"]}


class _BackboneAndNeck:
    """The pca init pass: the backbone's clustering features and the neck's, side by side in one (B, D + 256) row."""

    def __init__(self, model):
        self.model = model

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        backbone = self.model.backbone
        features = backbone.features(images)  # backbone(images) is train_activation(features(images))
        return torch.cat([features, self.model.neck(backbone.train_activation(features))], dim=1)


@torch.no_grad()
def _calibrate_batch_norm(model, loader, device) -> None:
    """One train-mode pass (no gradients) so that BN's running statistics describe the data before the memory
    is initialised from eval-mode features. An untrained net's running statistics (mean 0, variance 1) leave
    its eval-mode features nearly parallel (mean cosine 0.999 on the digits) and the initial k-means close to
    chance (NMI 0.2 vs 0.4 after this pass); DeepCluster's PCA-whitening does not need it."""
    model.train()
    for batch in loader:
        model.embed(batch.images.to(device))
    model.eval()


class _Identity:
    """Stands in for PCA where --odc-init neck clusters the L2-normalised features as they are."""

    def transform(self, features):
        return features
