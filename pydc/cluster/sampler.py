"""DeepCluster's uniform sampler over pseudo-labels (util.py UnifLabelSampler), with a distributed form.

One epoch's index list, for `labels` (one cluster label per sample) and `size` (N, DeepCluster passes the
dataset size):

1. m = number of non-empty clusters; every non-empty cluster gets s = N // m + 1 draws of its own sample
   indices, without replacement when the cluster has more than s members and with replacement otherwise
   (DeepCluster: replace = len(cluster) <= s).
2. All draws are concatenated and shuffled, then cut to N, or padded by repeating the list's head when
   shorter (DeepCluster: res += res[:N - len(res)]).

The list depends only on (seed, epoch) (numpy Generator seeded with both), never on the rank: with
world_size > 1 it is padded by its head to a multiple of world_size and rank r takes positions
r, r + world_size, ... so the ranks' shards together are that one list. set_epoch(epoch) draws the next
list, as DistributedSampler does. (DeepCluster draws with numpy's global RNG; the draws differ, the rule
is the same.)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _as_numpy_labels(labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"UniformLabelSampler: expected one label per sample (a 1-D sequence), got shape {array.shape}")
    if array.size == 0:
        raise ValueError("UniformLabelSampler: expected at least one labelled sample, got an empty label list")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"UniformLabelSampler: expected integer cluster labels, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def uniform_label_indices(labels, size: int, rng: np.random.Generator) -> np.ndarray:
    """One epoch of DeepCluster's uniform sampling (module docstring, steps 1-2) as an int64 array of `size`."""
    labels = _as_numpy_labels(labels)
    order = np.argsort(labels, kind="stable")          # sample indices grouped by cluster
    clusters, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    per_cluster = size // len(clusters) + 1
    with_replacement = counts <= per_cluster
    draws = []
    # Small clusters: per_cluster uniform draws each, with replacement.
    small_starts, small_counts = starts[with_replacement], counts[with_replacement]
    if small_starts.size:
        offsets = rng.integers(0, np.repeat(small_counts, per_cluster))
        draws.append(order[np.repeat(small_starts, per_cluster) + offsets])
    # Large clusters: per_cluster distinct members each (the per_cluster smallest of random keys).
    large = ~with_replacement
    if large.any():
        member_cluster = np.repeat(np.arange(len(clusters)), counts)
        in_large = large[member_cluster]
        keys = rng.random(int(in_large.sum()))
        positions = np.flatnonzero(in_large)             # positions in `order`, grouped by cluster
        ranked = positions[np.lexsort((keys, member_cluster[positions]))]
        rank_in_cluster = np.arange(ranked.size) - np.repeat(np.cumsum(counts[large]) - counts[large], counts[large])
        draws.append(order[ranked[rank_in_cluster < per_cluster]])
    indices = np.concatenate(draws)
    rng.shuffle(indices)
    # m * (N // m + 1) > N draws, so in practice this cuts; np.resize pads cyclically otherwise.
    return indices[:size] if indices.size >= size else np.resize(indices, size)


class UniformLabelSampler(torch.utils.data.Sampler[int]):
    """Iterates one epoch of DeepCluster's uniform sampling over pseudo-labels (see the module docstring)."""

    def __init__(self, labels, size: int, seed: int, epoch: int = 0, rank: int = 0, world_size: int = 1):
        self.labels = _as_numpy_labels(labels)
        if int(size) != size or size < 1:
            raise ValueError(f"UniformLabelSampler: expected size >= 1 indices per epoch, got {size!r}")
        if int(world_size) != world_size or world_size < 1:
            raise ValueError(f"UniformLabelSampler: expected world_size >= 1, got {world_size!r}")
        if int(rank) != rank or not 0 <= rank < world_size:
            raise ValueError(f"UniformLabelSampler: expected rank in [0, world_size) = [0, {world_size}), got {rank!r}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"UniformLabelSampler: expected a non-negative integer seed, got {seed!r}")
        self.size = int(size)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.total_size = -(-self.size // self.world_size) * self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_indices(self) -> np.ndarray:
        """The whole epoch's list (all ranks), padded by its head to a multiple of world_size."""
        rng = np.random.default_rng([self.seed, self.epoch])
        indices = uniform_label_indices(self.labels, self.size, rng)
        return np.resize(indices, self.total_size)  # cyclic padding by the list's head

    def __iter__(self) -> Iterator[int]:
        shard = self.epoch_indices()[self.rank:self.total_size:self.world_size]
        return iter(shard.tolist())

    def __len__(self) -> int:
        return self.total_size // self.world_size
