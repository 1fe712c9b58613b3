"""The memory of Online Deep Clustering (ODC): every sample's feature and label, kept on the device.

`ODCMemory` follows MMSelfSup's odc_memory.py (see DESIGN.md, "ODC memory") with three changes of *how*, not
*what*: the bank lives on the memory's device (CPU or GPU) instead of the host; class counts and fixed-point
class sums are updated incrementally by the sample-update op (no bincount over the bank each step, no pass
over the bank to recompute centroids); and every rule that MMSelfSup leaves to chance is made deterministic:

- duplicate indices in one batch are applied one after another in batch order (pydc.ops.odc);
- relabelling takes the argmax of the exact dot products, ties to the lowest class;
- the small-cluster pass sends members of small classes to the nearest (largest dot product, ties lowest)
  centroid among the classes that are not small; then, in ascending order, each now-empty class takes one
  half of the currently largest class (ties: lowest class), split by a deterministic 2-means (seeds: the
  member of lowest sample index and the member farthest from it; Lloyd iterations in float64 on squared L2
  distance, ties to the first seed, at most 20); the half around the second seed moves. When 2-means leaves a
  side empty (all members equal), a random half (torch.randperm with the memory's seeded CPU generator; the
  members at permutation positions >= n // 2) moves instead. Both classes' centroids are recomputed.

Distributed: with torch.distributed initialized, `init_memory` broadcasts rank 0's bank and labels and
`update_samples` all-gathers every rank's indices and features (rank 0's batch first, then rank 1's, ...)
and applies the whole gathered batch on every rank. Every other method is a deterministic function of that
replicated state (the random-halves generator is seeded identically), so all ranks hold identical memories
without further communication. Batches may differ in size between ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pydc.ops.odc import (
    NORM_EPS,
    centroids_from_class_sums,
    odc_centroids_from_sums,
    odc_class_sums,
    odc_update_samples,
    quantize_rows,
)

TWO_MEANS_ITERATIONS = 20


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's `tensor` (first dimension may differ between ranks), in rank order."""
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


class ODCMemory:
    """Feature bank, label bank, centroids and class counts of ODC, all on `device` (see module docstring)."""

    def __init__(self, length: int, feat_dim: int, num_classes: int, momentum: float = 0.5,
                 min_cluster: int = 20, device=None, dtype: torch.dtype = torch.float32, seed: int = 0):
        if length < 1 or feat_dim < 1 or num_classes < 1:
            raise ValueError(f"ODCMemory: expected length, feat_dim and num_classes >= 1, got {length}, "
                             f"{feat_dim}, {num_classes}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"ODCMemory: expected momentum in [0, 1], got {momentum}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"ODCMemory: expected dtype float32 or float64, got {dtype}")
        self.length, self.feat_dim, self.num_classes = int(length), int(feat_dim), int(num_classes)
        self.momentum, self.min_cluster = float(momentum), int(min_cluster)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.feature_bank = torch.zeros((length, feat_dim), dtype=dtype, device=self.device)
        self.label_bank = torch.zeros((length,), dtype=torch.int64, device=self.device)
        self.centroids = torch.zeros((num_classes, feat_dim), dtype=dtype, device=self.device)
        self.counts = torch.zeros((num_classes,), dtype=torch.int64, device=self.device)
        self.class_sums = torch.zeros((num_classes, feat_dim), dtype=torch.int64, device=self.device)

    # --- initialisation -------------------------------------------------------------------------------------
    def init_memory(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Store the L2-normalised features and the labels; compute counts and centroids."""
        if tuple(features.shape) != (self.length, self.feat_dim):
            raise ValueError(f"ODCMemory.init_memory: expected features of shape "
                             f"{(self.length, self.feat_dim)}, got {tuple(features.shape)}")
        if tuple(labels.shape) != (self.length,) or labels.dtype.is_floating_point:
            raise ValueError(f"ODCMemory.init_memory: expected integer labels of shape ({self.length},), got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        labels = labels.to(device=self.device, dtype=torch.int64)
        if self.length and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"ODCMemory.init_memory: labels must lie in [0, {self.num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        features = features.to(self.device).double()
        self.feature_bank.copy_(features / (features.norm(dim=1, keepdim=True) + NORM_EPS))
        self.label_bank.copy_(labels)
        if _distributed():
            dist.broadcast(self.feature_bank, src=0)
            dist.broadcast(self.label_bank, src=0)
        self.centroids.zero_()
        self.recount()
        self.update_centroids()

    def recount(self) -> None:
        """Recompute counts and class sums from the whole bank (exactly what the steps maintain)."""
        odc_class_sums(self.feature_bank, self.label_bank, self.class_sums, self.counts)

    # --- per step -------------------------------------------------------------------------------------------
    def update_samples(self, indices: torch.Tensor, features: torch.Tensor) -> float:
        """Blend the batch into its rows and relabel them; returns the fraction of label changes."""
        indices = indices.to(device=self.device, dtype=torch.int64)
        features = features.detach().to(device=self.device, dtype=self.dtype)
        if features.dim() != 2 or features.shape[1] != self.feat_dim or features.shape[0] != indices.shape[0]:
            raise ValueError(f"ODCMemory.update_samples: expected features of shape ({indices.shape[0]}, "
                             f"{self.feat_dim}), got {tuple(features.shape)}")
        if _distributed():
            indices = _all_gather_rows(indices)
            features = _all_gather_rows(features)
        if indices.numel() == 0:
            return 0.0
        changes = int(odc_update_samples(self.feature_bank, self.label_bank, self.counts, self.class_sums,
                                         self.centroids, indices, features, self.momentum))
        if changes < 0:  # the CUDA kernels refuse an out-of-range batch on the device and report it so
            raise IndexError(f"ODCMemory.update_samples: indices must lie in [0, {self.length}); the batch was "
                             "refused and the memory is unchanged")
        return changes / indices.numel()

    def update_centroids(self) -> None:
        """centroid_k = mean of the rows of class k (classes with no member keep their centroid)."""
        odc_centroids_from_sums(self.class_sums, self.counts, self.centroids, self.length)

    def loss_weights(self, power: float = 0.5) -> torch.Tensor:
        """Loss weights: (1 / (count + 1e-10))^power, normalised to sum 1 (MMSelfSup's set_reweight)."""
        inverse = (1.0 / (self.counts.double() + 1e-10)) ** power
        return (inverse / inverse.sum()).to(torch.float32)

    # --- small clusters -------------------------------------------------------------------------------------
    def deal_with_small_clusters(self) -> int:
        """Dissolve classes with fewer than min_cluster rows and refill them; returns how many."""
        small = self.counts < self.min_cluster
        if not bool(small.any()):
            return 0
        large = ~small
        if not bool(large.any()):
            return 0  # every class is small: there is no class to move members into, nothing to split
        members = small[self.label_bank].nonzero().squeeze(1)
        if members.numel():
            allowed = large.nonzero().squeeze(1)
            similarity = self.feature_bank[members].double() @ self.centroids[allowed].double().t()
            targets = allowed[similarity.argmax(dim=1)]
            self._move(members, self.label_bank[members], targets)
        empty = small.nonzero().squeeze(1).tolist()
        for cls in empty:
            largest = int(self.counts.argmax())
            rows = (self.label_bank == largest).nonzero().squeeze(1)
            if rows.numel() < 2:
                raise RuntimeError(f"ODCMemory: cannot refill class {cls}: the largest class {largest} has "
                                   f"{rows.numel()} member(s); use fewer classes than rows")
            moved = self._split(rows)
            self._move(moved, torch.full_like(moved, largest), torch.full_like(moved, cls))
            both = torch.tensor([largest, cls], device=self.device)
            self.centroids[both] = centroids_from_class_sums(self.class_sums[both], self.counts[both],
                                                             self.length, self.dtype)
        return len(empty)

    def _move(self, rows: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """Relabel rows from sources to targets, keeping counts and class sums exact."""
        self.label_bank[rows] = targets
        ones = torch.ones_like(rows)
        self.counts.index_add_(0, sources, -ones)
        self.counts.index_add_(0, targets, ones)
        quantized = quantize_rows(self.feature_bank[rows], self.length)
        self.class_sums.index_add_(0, sources, -quantized)
        self.class_sums.index_add_(0, targets, quantized)

    def _split(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows (ascending sample index) that leave the largest class: 2-means, random halves fallback."""
        points = self.feature_bank[rows].double()
        first = points[0]
        second = points[((points - first) ** 2).sum(dim=1).argmax()]
        assignment = None
        for _ in range(TWO_MEANS_ITERATIONS):
            to_second = ((points - second) ** 2).sum(dim=1) < ((points - first) ** 2).sum(dim=1)
            if assignment is not None and torch.equal(to_second, assignment):
                break
            assignment = to_second
            moving = int(assignment.sum())
            if moving == 0 or moving == rows.numel():
                break
            first, second = points[~assignment].mean(dim=0), points[assignment].mean(dim=0)
        moving = int(assignment.sum())
        if 0 < moving < rows.numel():
            return rows[assignment]
        permutation = torch.randperm(rows.numel(), generator=self.generator)
        positions = torch.sort(permutation[rows.numel() // 2:]).values.to(self.device)
        return rows[positions]

    # --- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "feature_bank": self.feature_bank.clone(),
            "label_bank": self.label_bank.clone(),
            "centroids": self.centroids.clone(),
            "counts": self.counts.clone(),
            "momentum": self.momentum,
            "min_cluster": self.min_cluster,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("feature_bank", "label_bank", "centroids", "counts"):
            current, given = getattr(self, name), state[name]
            if tuple(given.shape) != tuple(current.shape):
                raise ValueError(f"ODCMemory.load_state_dict: {name} has shape {tuple(given.shape)}, "
                                 "this memory "
                                 f"expects {tuple(current.shape)}")
            current.copy_(given)
        self.momentum = float(state.get("momentum", self.momentum))
        self.min_cluster = int(state.get("min_cluster", self.min_cluster))
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self.recount()  # class sums are not stored: they follow exactly from the bank and the labels
