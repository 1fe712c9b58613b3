"""DeepCluster-v2 (Caron et al., 2020, with SwAV; after facebookresearch/swav main_deepclusterv2.py).

The network (dcv2_model.py) embeds every crop of a multi-crop batch (2 large + several small crops, SwAV's colour
distortion at strength --dcv2-color-strength, RGB stem by default) on the unit sphere. A memory holds, for every
image, the embeddings of its two large crops from the last time the image was trained on, so clustering needs no
feature pass:

- epoch start: for each prototype set j (--dcv2-prototypes, default 3; k = --k clusters each), spherical
  k-means (--dcv2-kmeans-iters, default 10) of the memory of large crop j mod 2, on the device with pydc's
  k-means ops. The centroids become prototype set j (unit norm, never trained); the labels are the images'
  assignments for set j. In torch.distributed each rank clusters its 1/W of the memory's rows (sharded
  k-means, --cluster-on shard or auto), or rank 0 clusters all and broadcasts both (--cluster-on gather).
  The epoch record's `memory_cosine` (mean cosine between the memory's rows) shows whether the embeddings
  collapse.
- every step: loss = mean over prototype sets of the cross-entropy of (embedding . prototypes) / temperature
  (--dcv2-temperature, 0.1) against the image's assignment, over all crops; then the two large crops'
  embeddings of the batch overwrite the images' memory rows (all-gathered from every rank, so that each rank
  holds the whole memory; an image drawn twice in one gathered batch keeps its first occurrence).
- the first epoch's memory: as SwAV, one pass over the training loader (epoch 0's order and crops) in train
  mode without gradients, before the first clustering; it is timed as `time_features`.

Differences from SwAV: the memory is replicated on every rank (SwAV keeps each rank's share; the k-means is
distributed in both); k-means refills empty clusters by splitting others (pydc.cluster.kmeans) where SwAV keeps
the old centroid; SGD as the other algorithms instead of LARS (--lr-schedule cosine and --warmup-epochs give
SwAV's schedule; on the digits a warm-up neither prevented the collapse nor sped up learning, README); for `small`
no colour distortion and large crops from half the image, since on the grey digits SwAV's jitter made the
embeddings collapse (README).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from pydc.algorithms.base import Algorithm, Loaders, epoch_seed, shuffled_shard
from pydc.algorithms.dcv2_model import DCv2Model
from pydc.algorithms.features import progress_bar, synchronize
from pydc.data.geometry import CropView
from pydc.utils import dist as dist_utils

LARGE_CROPS = 2  # the crops whose embeddings the memory keeps (SwAV's crops_for_assign = [0, 1])
EMBEDDING_DIM = 128
UNASSIGNED = -100  # F.cross_entropy's default ignore_index


class DeepClusterV2(Algorithm):
    name = "dcv2"

    def __init__(self, args, num_images: int, device: torch.device):
        super().__init__(args, num_images, device)
        self.num_sets = int(args.dcv2_prototypes)
        self.memory = torch.zeros(LARGE_CROPS, num_images, EMBEDDING_DIM, device=device)
        self.memory_filled = False
        self.prototypes = torch.zeros(self.num_sets, args.k, EMBEDDING_DIM, device=device)
        self.labels = torch.full((self.num_sets, num_images), UNASSIGNED, dtype=torch.int64, device=device)
        self._step_indices: torch.Tensor | None = None      # the last batch's indices and large-crop embeddings,
        self._step_embeddings: torch.Tensor | None = None   # from `loss` to `after_step`

    def build(self, backbone):
        hidden = 512 if self.args.arch == "small" else 2048
        self.model = DCv2Model(backbone, hidden, EMBEDDING_DIM).to(self.device)
        return self.model, list(self.model.parameters()), []  # the prototypes are not trained: no head optimizer

    def train_views(self) -> tuple[CropView, ...]:
        """2 large crops (--crop, scale [--dcv2-large-scale, 1]) + --dcv2-small-crops small ones."""
        args = self.args
        large = CropView(args.crop, (args.dcv2_large_scale, 1.0))
        small = CropView(args.dcv2_small_size, (args.dcv2_small_scale, args.dcv2_large_scale))
        return (large,) * LARGE_CROPS + (small,) * args.dcv2_small_crops

    def color_distortion(self) -> float:
        return float(self.args.dcv2_color_strength)

    # --- epoch start: fill the memory once, then cluster it -------------------------------------------------------
    def begin_epoch(self, epoch: int, loaders: Loaders) -> dict:
        record = {}
        if not self.memory_filled:
            start = time.perf_counter()
            self._fill_memory(epoch, loaders.train)
            record["time_features"] = time.perf_counter() - start
        start = time.perf_counter()
        objectives = self.cluster_memory(epoch)
        synchronize(self.device)
        record["time_kmeans"] = time.perf_counter() - start
        record["kmeans_objective"] = objectives[0]
        # Collapse watch: near 1 when the embeddings crowd together (then k-means splits noise, see the README).
        record["memory_cosine"] = mean_pairwise_cosine(self.memory[0])
        return record

    @torch.no_grad()
    def _fill_memory(self, epoch: int, train_loader) -> None:
        rank, world_size = dist_utils.rank(), dist_utils.world_size()
        train_loader.set_epoch(epoch)
        train_loader.set_order(self.order(epoch, rank, world_size))
        self.model.train()
        progress = progress_bar(len(train_loader), f"epoch {epoch} memory")
        for batch in train_loader:
            views = batch.views or [batch.images]
            embeddings = self.model(views[:LARGE_CROPS])
            self._write_memory(batch.indices.to(self.device), embeddings)
            progress.update(1)
        progress.close()
        self.memory_filled = True

    @torch.no_grad()
    def cluster_memory(self, epoch: int) -> list[float]:
        """Spherical k-means of the memory for every prototype set; returns each set's final objective.

        The memory is on every rank, so gathering costs nothing and sharding saves no memory; what sharding
        saves is time: with --cluster-on shard (and auto under torchrun) each rank clusters its contiguous
        1/W of the rows (sharded_kmeans: one all-reduce of k x 129 float64 per iteration, then the int32
        labels gathered) instead of rank 0 clustering all of them while the others wait, as SwAV's distributed
        k-means. Otherwise rank 0 clusters and broadcasts.
        """
        args = self.args
        if args.cluster_on == "shard" or (args.cluster_on == "auto" and dist_utils.is_distributed()):
            return self._cluster_memory_sharded(epoch)
        from pydc.cluster import kmeans

        objectives = [float("nan")] * self.num_sets
        if dist_utils.is_main_process():
            for number in range(self.num_sets):
                result = kmeans(self.memory[number % LARGE_CROPS], args.k, niter=args.dcv2_kmeans_iters,
                                seed=self._kmeans_seed(epoch, number), backend="torch", spherical=True)
                self.prototypes[number].copy_(F.normalize(result.centroids, dim=1))
                self.labels[number].copy_(result.labels)
                if result.objective:
                    objectives[number] = float(result.objective[-1])
        dist_utils.broadcast_tensor(self.prototypes, 0)
        dist_utils.broadcast_tensor(self.labels, 0)
        return objectives

    def _cluster_memory_sharded(self, epoch: int) -> list[float]:
        from pydc.algorithms.sharded_clustering import cluster_shard

        rows = torch.arange(self.num_images).tensor_split(dist_utils.world_size())[dist_utils.rank()]
        start, stop = (int(rows[0]), int(rows[-1]) + 1) if rows.numel() else (0, 0)
        objectives = []
        for number in range(self.num_sets):
            labels, timings, centroids = cluster_shard(self.memory[number % LARGE_CROPS, start:stop], None, self.args.k,
                                                       self._kmeans_seed(epoch, number), self.args.dcv2_kmeans_iters,
                                                       self.num_images, spherical=True)
            self.prototypes[number].copy_(F.normalize(centroids, dim=1))
            self.labels[number].copy_(labels)
            objectives.append(timings["kmeans_objective"])
        return objectives

    def _kmeans_seed(self, epoch: int, number: int) -> int:
        return epoch_seed(self.args.seed, epoch) * self.num_sets + number

    def order(self, epoch: int, rank: int, world_size: int) -> list[int]:
        """A seeded shuffle of every image."""
        return shuffled_shard(self.num_images, self.args.seed, epoch, rank, world_size)

    # --- per step ---------------------------------------------------------------------------------------------
    def loss(self, model, batch) -> torch.Tensor:
        views = batch.views or [batch.images]
        embeddings = model(views)  # (len(views) * B, 128), unit rows, views in order
        batch_size = views[0].shape[0]
        indices = batch.indices.to(self.device)
        self._step_indices = indices
        self._step_embeddings = embeddings[: LARGE_CROPS * batch_size].detach()
        return prototype_loss(embeddings, self.prototypes, self.labels[:, indices], self.args.dcv2_temperature)

    def after_step(self, global_step: int) -> dict:
        self._write_memory(self._step_indices, self._step_embeddings)
        self._step_indices = self._step_embeddings = None
        return {}

    def _write_memory(self, indices: torch.Tensor, embeddings: torch.Tensor) -> None:
        """Store the large crops' embeddings ((2 B, 128), crop-major) of images `indices` (B,) in the memory,
        gathered from every rank; a repeated image keeps its first occurrence (rank order, then batch order)."""
        batch_size = indices.shape[0]
        per_image = embeddings.float().view(LARGE_CROPS, batch_size, -1).transpose(0, 1).contiguous()
        indices = dist_utils.all_gather_rows(indices)
        per_image = dist_utils.all_gather_rows(per_image)
        unique, inverse = torch.unique(indices, return_inverse=True)
        positions = torch.arange(indices.shape[0], device=indices.device)
        first = torch.full_like(unique, indices.shape[0]).scatter_reduce_(0, inverse, positions, reduce="amin")
        self.memory[:, unique] = per_image[first].transpose(0, 1).to(self.memory.device)

    # --- state ------------------------------------------------------------------------------------------------
    def assignments(self) -> torch.Tensor | None:
        """The first prototype set's assignments (the logs' and plots' clusters)."""
        if not self.memory_filled:
            return None
        return self.labels[0].detach().clone().cpu()

    def state_dict(self) -> dict:
        return {"memory": self.memory.clone(), "memory_filled": self.memory_filled,
                "prototypes": self.prototypes.clone(), "assignments": self.labels.clone()}

    def load_state_dict(self, state: dict) -> None:
        for name, current in (("memory", self.memory), ("prototypes", self.prototypes), ("assignments", self.labels)):
            if tuple(state[name].shape) != tuple(current.shape):
                raise ValueError(f"{self.name} state: {name} has shape {tuple(state[name].shape)}, this run expects "
                                 f"{tuple(current.shape)} (the same --k, --dcv2-prototypes and data are needed)")
            current.copy_(state[name].to(current.device))
        self.memory_filled = bool(state["memory_filled"])


def prototype_loss(embeddings: torch.Tensor, prototypes: torch.Tensor, targets: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """Mean over prototype sets j of cross_entropy(embeddings @ prototypes[j].T / temperature, targets[j]
    repeated for every crop view). embeddings (V B, D), prototypes (H, k, D), targets (H, B)."""
    views = embeddings.shape[0] // targets.shape[1]
    losses = [F.cross_entropy(embeddings @ prototypes[number].t() / temperature, targets[number].repeat(views),
                              ignore_index=UNASSIGNED) for number in range(prototypes.shape[0])]
    return torch.stack(losses).mean()


def mean_pairwise_cosine(rows: torch.Tensor) -> float:
    """Mean of rows[i] . rows[j] over the pairs i != j of unit rows (N, D), in O(N D):
    (|sum of rows|^2 - sum of |rows[i]|^2) / (N (N - 1))."""
    count = rows.shape[0]
    if count < 2:
        return float("nan")
    rows = rows.double()
    total = rows.sum(dim=0)
    return float((total.dot(total) - rows.pow(2).sum()) / (count * (count - 1)))
