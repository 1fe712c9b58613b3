"""What sharded clustering (pydc.cluster.sharded) holds per rank and moves between ranks, from the code's own
buffers; `python -m pydc.cluster.sharded_memory --table` prints the README's table.

Per rank (the rank with the largest shard, ceil(N / W) rows), in bytes:
    features shard      rows x D x feature itemsize (the feature pass's output, kept by the caller)
    whitened shard      rows x pca_dim x 4 (float32, pca.transform's output, the k-means input)
    k-means rows        rows x 25: squared norms (4), labels of this and the previous iteration (8 + 8),
                        distances (4), the changed-label mask (1); on CUDA 16 more: the label sort of the
                        reproducible cluster sums (order and sorted labels, int64)
    PCA moments         D^2 x 12 + D x 16 (float64 Gram, float32 pending Gram, shift, sum), plus D^2 x 24 while
                        the moments are merged (the full Gram about the common shift and two float64 temporaries)
    centroid state      k x pca_dim x 16 (float32 centroids and sums, the float64 all-reduce buffer) + k x 16
    k-means block       SUM_CHUNK_ROWS x pca_dim x 8: the float64 copy of a block of rows for the cluster sums
    global labels       N x 12: the int64 index draw of the initial centroids (transient, host) and the int32
                        labels gathered at the end
The features shard and the per-row parts fall as 1/W; the rest does not depend on W. Gathering every
feature on every rank instead (what compute_features does today) holds N x D x itemsize on each.

Traffic, in bytes handed to one collective (a ring all-reduce sends and receives 2 (W - 1) / W times that
per rank, an all-gather (W - 1) / W times the gathered total, a broadcast about once):
    k-means, per iteration: one all-reduce of 8 (k pca_dim + k + 2) (float64 sums, counts, objective, changes)
    k-means initial centroids: one all-reduce of 4 k pca_dim (each row from the rank holding it)
    PCA: all-reduces of 32 (feature widths, component counts), 8 (D + 1) (count, column sums) and 8 (D^2 + D) (Gram, sums
         about the common shift),
         then a broadcast of rank 0's fit, 8 (D + pca_dim D + 2 pca_dim + 1)
    labels: an all-gather of 4 N (int32)
Time at a bus bandwidth B (NCCL's busbw, which already folds in the ring factor): bytes x 2 (W - 1) / W / B
for an all-reduce, bytes x (W - 1) / W / B for an all-gather of `bytes` in total, bytes / B for a broadcast;
latency (tens of microseconds per collective) is left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from pydc.cluster.sharded import SUM_CHUNK_ROWS

KMEANS_BYTES_PER_ROW = 25
CUDA_SORT_BYTES_PER_ROW = 16
# NCCL bus bandwidths assumed for the table (see the README for the figures behind them).
NVLINK_BUS_BYTES_PER_S = 400e9     # all-reduce busbw within one 8-GPU H100 SXM node (NVLink 4, NVSwitch)
INFINIBAND_BUS_BYTES_PER_S = 40e9  # across nodes, 8 x 400 Gb/s NDR per node: 50 GB/s line rate per GPU


@dataclasses.dataclass(frozen=True)
class ClusterMemory:
    """Bytes per rank (the largest shard) and bytes per collective; see the module docstring."""
    world_size: int
    shard_rows: int
    features_shard: int
    whitened_shard: int
    kmeans_rows: int
    pca_moments: int
    pca_merge_extra: int
    centroid_state: int
    kmeans_block: int
    global_labels: int
    gathered_features: int       # what gathering every feature on every rank holds instead
    kmeans_allreduce: int        # per iteration
    init_allreduce: int
    pca_allreduce: int
    pca_broadcast: int
    labels_allgather: int        # gathered total

    @property
    def per_rank_total(self) -> int:
        """An upper bound on the cluster stage's peak: every part at once."""
        return (self.features_shard + self.whitened_shard + self.kmeans_rows + self.pca_moments + self.pca_merge_extra
                + self.centroid_state + self.kmeans_block + self.global_labels)

    @property
    def per_row_part(self) -> int:
        """The part that falls as 1/W: the shards and the k-means per-row state."""
        return self.features_shard + self.whitened_shard + self.kmeans_rows


def cluster_memory(n_rows: int, dim: int, pca_dim: int, k: int, world_size: int,
                   feature_dtype: torch.dtype = torch.float32, device_type: str = "cuda") -> ClusterMemory:
    """Per-rank memory and traffic of sharded PCA + k-means over n_rows x dim features on world_size ranks
    (device_type "cuda" or "cpu": the k-means per-row state differs)."""
    for name, value in (("n_rows", n_rows), ("dim", dim), ("pca_dim", pca_dim), ("k", k), ("world_size", world_size)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"cluster_memory: expected {name} to be a positive integer, got {value!r}")
    if pca_dim > dim:
        raise ValueError(f"cluster_memory: expected pca_dim <= dim, got pca_dim = {pca_dim} for dim = {dim}")
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"cluster_memory: expected device_type 'cuda' or 'cpu', got {device_type!r}")
    itemsize = torch.empty((), dtype=feature_dtype).element_size()
    per_row = KMEANS_BYTES_PER_ROW + (CUDA_SORT_BYTES_PER_ROW if device_type == "cuda" else 0)
    rows = math.ceil(n_rows / world_size)
    return ClusterMemory(
        world_size=world_size, shard_rows=rows,
        features_shard=rows * dim * itemsize, whitened_shard=rows * pca_dim * 4,
        kmeans_rows=rows * per_row,
        pca_moments=dim * dim * 12 + dim * 16, pca_merge_extra=dim * dim * 24,
        centroid_state=k * pca_dim * 16 + k * 16, kmeans_block=min(rows, SUM_CHUNK_ROWS) * pca_dim * 8,
        global_labels=n_rows * 12,
        gathered_features=n_rows * dim * itemsize,
        kmeans_allreduce=8 * (k * pca_dim + k + 2), init_allreduce=4 * k * pca_dim,
        pca_allreduce=32 + 8 * (dim + 1) + 8 * (dim * dim + dim),
        pca_broadcast=8 * (dim + pca_dim * dim + 2 * pca_dim + 1), labels_allgather=4 * n_rows)


def all_reduce_seconds(n_bytes: int, world_size: int, bus_bytes_per_s: float) -> float:
    """Ring all-reduce time of n_bytes at NCCL bus bandwidth: each rank moves 2 (W - 1) / W x n_bytes."""
    return n_bytes * 2 * (world_size - 1) / world_size / bus_bytes_per_s


def all_gather_seconds(total_bytes: int, world_size: int, bus_bytes_per_s: float) -> float:
    return total_bytes * (world_size - 1) / world_size / bus_bytes_per_s


# ------------------------------------------------------------------------------------------------- table
TABLE_CASES = (  # (data, N, D)
    ("ImageNet-1k, ResNet-50", 1_281_167, 2048),
    ("ImageNet-1k, AlexNet/VGG fc7", 1_281_167, 4096),
    ("ImageNet-22k, ResNet-50", 14_197_122, 2048),
)


def _size(n_bytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes:.0f} B"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def table(pca_dim: int = 256, k: int = 10_000, worlds=(8, 64)) -> str:
    """The README's markdown table: per-rank memory and traffic for TABLE_CASES on `worlds` ranks."""
    lines = ["| data (N x D) | GPUs | per rank: features / whitened / total | gather-all instead | "
             "k-means all-reduce per iteration | one node, NVLink | across nodes, IB | "
             "PCA all-reduce: NVLink / IB | labels all-gather: NVLink / IB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, n_rows, dim in TABLE_CASES:
        for world in worlds:
            m = cluster_memory(n_rows, dim, pca_dim, k, world)

            def both(seconds_at, n_bytes):
                nvlink = _ms(seconds_at(n_bytes, world, NVLINK_BUS_BYTES_PER_S)) if world <= 8 else "-"
                return nvlink, _ms(seconds_at(n_bytes, world, INFINIBAND_BUS_BYTES_PER_S))

            iteration = both(all_reduce_seconds, m.kmeans_allreduce)
            pca = both(all_reduce_seconds, m.pca_allreduce)
            labels = both(all_gather_seconds, m.labels_allgather)
            lines.append(
                f"| {name} ({n_rows:,} x {dim}) | {world} | {_size(m.features_shard)} / {_size(m.whitened_shard)} / "
                f"{_size(m.per_rank_total)} | {_size(m.gathered_features)} | {_size(m.kmeans_allreduce)} | "
                f"{iteration[0]} | {iteration[1]} | {_size(m.pca_allreduce)}: {pca[0]} / {pca[1]} | "
                f"{_size(m.labels_allgather)}: {labels[0]} / {labels[1]} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pydc.cluster.sharded_memory",
                                     description="Per-rank memory and traffic of sharded PCA + k-means.")
    parser.add_argument("--table", action="store_true", help="print the README's markdown table")
    parser.add_argument("--pca-dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=10_000)
    args = parser.parse_args(argv)
    if not args.table:
        parser.error("nothing to do: pass --table")
    print(table(args.pca_dim, args.k))


if __name__ == "__main__":
    main()
