"""PCA-whitening and k-means over features sharded across ranks: each rank keeps its rows, only statistics move.

A shard is the rows one rank holds. By default the shards are contiguous row ranges in rank order (rank r
holds global rows [offset_r, offset_r + n_r), offset_r = n_0 + ... + n_{r-1}, shards of any sizes, empty
ones too); `global_index` (n_r,) int64 names each local row's global row instead (together the ranks' indices
must be a permutation of [0, N)). Every function is collective: every rank of `group` (None: the default
group) calls it with the same arguments apart from its own rows. Without an initialised process group they
run on the one process's rows.

all_reduce_pca_(pca): after each rank has streamed its shard into PCAWhitening.partial_fit, merges the
    moments and fits: (1) all-reduce of the row count and the column sums -> the global mean m; (2) each rank
    re-expresses its shifted sum and Gram matrix about m (PCAWhitening.moments_about: the ranks' shifts
    differ, they are reconciled exactly in float64) and they are all-reduced in float64; (3) rank 0 fits
    (eigh) and broadcasts the fit, so every rank holds bitwise the same projection. Equal to the one-process
    fit on the concatenated rows up to float64 rounding of the moments (float32 features: up to the float32
    Gram products PCAWhitening accumulates anyway). Each rank then whitens its own shard with pca.transform.

sharded_kmeans(x_local, k, ...): the Lloyd iterations of pydc.cluster.kmeans (backend "torch") on the union of
    the shards. Initial centroids: the rows initial_centroids would draw from the concatenated rows with `seed`
    (every rank draws the same global indices, each contributes the rows it holds; all-reduced bit-exactly),
    or `init_centroids` as rank 0 passes them. Per iteration: local kmeans_assign; local per-cluster sums in
    float64 and counts; one all-reduce of [sums, counts, objective, changed labels] in float64; centroids =
    float32(sums) / counts as the one-process update computes them; empty clusters refilled by
    split_empty_clusters from the global sizes with a generator seeded seed + 1 on every rank (the same draws
    everywhere). The loop stops at a fixed point: when an iteration changes no label and leaves no cluster
    empty, every later iteration would repeat it exactly. Labels stay sharded; gather_labels all-gathers them
    as int32 in global order (for the uniform sampler and the logs).
    Same labels, centroids and objective as one process from the same initial centroids, up to the float64
    summation order of the cluster sums and objective (their float32 roundings agree but in rare double
    rounding cases). The local sums are bitwise reproducible on the CPU and on CUDA (_cluster_sums_float64).

Bytes each step moves, and what each rank holds: pydc.cluster.sharded_memory.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from pydc.cluster.kmeans import _normalize_rows, split_empty_clusters, squared_row_norms
from pydc.cluster.pca import PCAWhitening
from pydc.ops.kmeans import kmeans_assign

# Rows copied to float64 (cluster sums) or squared (norms) at a time: at 256-d an 8192-row float64 block is
# 16.8 MB, small beside any shard worth sharding, and index_add_ runs at full speed on blocks this size.
SUM_CHUNK_ROWS = 8192


# ------------------------------------------------------------------------------------------- collectives
def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _rank(group) -> int:
    return dist.get_rank(group) if _world(group) > 1 else 0


def _all_reduce(tensor: torch.Tensor, group, op=None) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return tensor


def _broadcast_from_first(tensor: torch.Tensor, group) -> torch.Tensor:
    if _world(group) > 1:
        dist.broadcast(tensor, dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return tensor


def _all_gather_padded(local: torch.Tensor, counts: list[int], group) -> list[torch.Tensor]:
    """Every rank's `local` (rank r's has counts[r] rows), padded to the longest for all_gather, then cut."""
    if _world(group) == 1:
        return [local]
    padded = local.new_zeros((max(counts),) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(pieces, padded, group=group)
    return [piece[:count] for piece, count in zip(pieces, counts)]


def _collective_device(group, fallback: torch.device) -> torch.device:
    """Where tensors handed to the group's collectives live: the current GPU for NCCL, else `fallback`."""
    if _world(group) > 1 and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


def shard_sizes(local_rows: int, group=None, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's row count, in rank order (one all_gather of an int64)."""
    if _world(group) == 1:
        return [int(local_rows)]
    mine = torch.tensor([int(local_rows)], dtype=torch.int64, device=_collective_device(group, torch.device(device)))
    sizes = [torch.empty_like(mine) for _ in range(_world(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


# ------------------------------------------------------------------------------------------------- PCA
def all_reduce_pca_(pca: PCAWhitening, group=None) -> PCAWhitening:
    """Merges every rank's PCAWhitening moments and fits; afterwards every rank holds the same moments (so a
    checkpoint of any rank resumes) and bitwise the same fit, rank 0's. See the module docstring."""
    seen = pca.n_samples_seen_ > 0  # a rank whose shard was empty has no moments (nor a device of its own)
    row_sums = pca.sum_of_rows() if seen else None
    device = _collective_device(group, row_sums.device if seen else torch.device("cpu"))
    d, k = (pca.n_features_in_ if seen else -1), pca.n_components
    # one MAX all-reduce gives the largest and (negated) the smallest feature width and component count
    extremes = _all_reduce(torch.tensor([d, -d if seen else -(2**62), k, -k], dtype=torch.int64, device=device),
                           group, dist.ReduceOp.MAX).tolist()
    d, smallest = extremes[0], -extremes[1]
    if d < 1:
        raise ValueError("all_reduce_pca_: no rank has seen any rows; call pca.partial_fit(batch) on every rank's "
                         "features first")
    if smallest != d:
        raise ValueError(f"all_reduce_pca_: the ranks' features have between {smallest} and {d} columns; expected "
                         "the same feature width on every rank")
    if extremes[2] != -extremes[3]:
        raise ValueError(f"all_reduce_pca_: the ranks' PCAWhitening objects have between {-extremes[3]} and "
                         f"{extremes[2]} components; construct them alike on every rank")
    # (1) the global mean, the common shift (any shift is exact in theory; the mean keeps the products centred)
    totals = torch.zeros(d + 1, dtype=torch.float64, device=device)
    if seen:
        totals[0] = pca.n_samples_seen_
        totals[1:] = row_sums.to(device)
    _all_reduce(totals, group)
    n_total = int(totals[0])
    if n_total == 0:
        raise ValueError("all_reduce_pca_: no finite rows on any rank; nothing to fit")
    mean = totals[1:] / n_total
    # (2) moments about that common shift, summed over the ranks
    if seen:
        sum_about_mean, gram = pca.moments_about(mean)
        sum_about_mean, gram = sum_about_mean.to(device), gram.to(device)
    else:
        sum_about_mean = torch.zeros(d, dtype=torch.float64, device=device)
        gram = torch.zeros((d, d), dtype=torch.float64, device=device)
    _all_reduce(gram, group)
    _all_reduce(sum_about_mean, group)
    pca.load_moments(n_total, mean, sum_about_mean, gram)
    # (3) rank 0 fits; the others take its fit (eigh's last bits could differ between processes otherwise)
    if _world(group) > 1:
        packed = torch.empty(d + k * d + 2 * k + 1, dtype=torch.float64, device=device)
        if _rank(group) == 0:
            fit = pca.fit_tensors()
            torch.cat([fit["mean"].reshape(-1), fit["components"].reshape(-1), fit["eigenvalues"], fit["scale"],
                       fit["total_variance"].reshape(1)], out=packed)
        _broadcast_from_first(packed, group)
        if _rank(group) != 0:
            mean_part, components, eigenvalues, scale, total = packed.split([d, k * d, k, k, 1])
            pca.load_fit({"mean": mean_part, "components": components.view(k, d), "eigenvalues": eigenvalues,
                          "scale": scale, "total_variance": total[0]})
    return pca


# ---------------------------------------------------------------------------------------------- k-means
@dataclasses.dataclass
class ShardedKMeansResult:
    centroids: torch.Tensor   # (k, d) float32, identical on every rank
    labels: torch.Tensor      # (n_local,) int64: nearest centroid of `centroids` for this rank's rows
    objective: list[float]    # per iteration run: the global sum of squared distances of that assignment
    iterations: int           # Lloyd iterations run (fewer than niter when a fixed point came first)
    splits: int               # empty clusters refilled over all iterations
    sizes: list[int]          # every rank's row count, in rank order


class _Shards:
    """Where the global rows live: this rank's rows as global indices, checked once."""

    def __init__(self, n_local: int, global_index: torch.Tensor | None, group, device: torch.device):
        self.group, self.device = group, device
        self.sizes = shard_sizes(n_local, group, _collective_device(group, device))
        self.total = sum(self.sizes)
        self.offset = sum(self.sizes[: _rank(group)])
        self.global_index = None
        if global_index is not None:
            self._check_global_index(global_index, n_local)
            self.global_index = global_index.to(device=device, dtype=torch.int64)

    def _check_global_index(self, index: torch.Tensor, n_local: int) -> None:
        if index.dim() != 1 or index.shape[0] != n_local or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"sharded_kmeans: expected global_index to be an int64 tensor of shape ({n_local},) (one "
                             f"global row per local row), got {index.dtype} of shape {tuple(index.shape)}")
        if n_local and (int(index.min()) < 0 or int(index.max()) >= self.total):
            raise ValueError(f"sharded_kmeans: expected global_index values in [0, {self.total}) (the rows of all "
                             f"ranks), got values in [{int(index.min())}, {int(index.max())}]")
        # A permutation of [0, N) has these power sums (int64 arithmetic wraps alike on both sides).
        index = index.to(torch.int64)
        sums = torch.stack([index.sum(), (index * index).sum()]).to(_collective_device(self.group, index.device))
        _all_reduce(sums, self.group)
        n = self.total
        expected = [n * (n - 1) // 2, (n - 1) * n * (2 * n - 1) // 6]
        wrapped = [((value + 2**63) % 2**64) - 2**63 for value in expected]
        if [int(s) for s in sums] != wrapped:
            raise ValueError(f"sharded_kmeans: the ranks' global_index values together are not a permutation of "
                             f"[0, {n}) (some rows are missing or held twice)")

    def local_rows_of(self, global_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions in the global list that this rank holds, their local row numbers)."""
        if self.global_index is None:
            local = global_rows - self.offset
            held = (local >= 0) & (local < self.sizes[_rank(self.group)])
        else:
            order = torch.argsort(self.global_index)
            sorted_index = self.global_index[order]
            place = torch.searchsorted(sorted_index, global_rows).clamp_max(max(sorted_index.shape[0] - 1, 0))
            held = (sorted_index[place] == global_rows) if sorted_index.numel() else torch.zeros_like(global_rows,
                                                                                                    dtype=torch.bool)
            local = order[place] if sorted_index.numel() else global_rows
        positions = torch.nonzero(held).flatten()
        return positions, local[positions]


def _initial_centroids(x: torch.Tensor, k: int, seed: int, shards: _Shards) -> torch.Tensor:
    """What initial_centroids(x_all, k, seed) draws from the concatenated rows: the same global indices from the
    same CPU generator on every rank; each row is filled in by the rank holding it, and the all-reduce of the
    float32 bits as int32 (all other ranks add 0) reproduces it exactly."""
    generator = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(shards.total, generator=generator)[:k].to(x.device)
    positions, local_rows = shards.local_rows_of(chosen)
    centroids = torch.zeros((k, x.shape[1]), dtype=torch.float32, device=_collective_device(shards.group, x.device))
    centroids[positions.to(centroids.device)] = x.index_select(0, local_rows).to(centroids.device)
    _all_reduce(centroids.view(torch.int32), shards.group)
    return centroids.to(x.device)


def _cluster_sums_float64(x: torch.Tensor, labels: torch.Tensor, out: torch.Tensor) -> None:
    """out[c] += sum of the rows labelled c, in float64, a bounded number of rows copied to float64 at a time.

    On the CPU index_add_ adds the rows in point order. On CUDA index_add_ would add with atomics, in an order
    that varies from run to run, so there the rows are sorted by label (stable) and each chunk's segments are
    summed by segment_reduce, then added at distinct indices: bitwise reproducible.
    """
    if not x.is_cuda:
        for start in range(0, x.shape[0], SUM_CHUNK_ROWS):
            out.index_add_(0, labels[start:start + SUM_CHUNK_ROWS], x[start:start + SUM_CHUNK_ROWS].to(torch.float64))
        return
    _sorted_cluster_sums_float64(x, labels, out)


def _sorted_cluster_sums_float64(x: torch.Tensor, labels: torch.Tensor, out: torch.Tensor) -> None:
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    for start in range(0, x.shape[0], SUM_CHUNK_ROWS):
        rows = order[start:start + SUM_CHUNK_ROWS]
        clusters, lengths = torch.unique_consecutive(sorted_labels[start:start + SUM_CHUNK_ROWS], return_counts=True)
        segment_sums = torch.segment_reduce(x.index_select(0, rows).to(torch.float64), "sum", lengths=lengths, axis=0)
        out.index_add_(0, clusters, segment_sums)  # distinct clusters: no two additions meet


def _check_kmeans_arguments(x_local, k, niter, init_centroids) -> None:
    if not isinstance(x_local, torch.Tensor) or x_local.dim() != 2 or not x_local.dtype.is_floating_point:
        raise ValueError(f"sharded_kmeans: expected x_local to be a 2-D floating point tensor (this rank's rows), got "
                         f"{getattr(x_local, 'dtype', type(x_local).__name__)} of shape "
                         f"{tuple(getattr(x_local, 'shape', ()))}")
    if x_local.shape[1] < 1:
        raise ValueError(f"sharded_kmeans: expected rows with at least one feature, got shape {tuple(x_local.shape)}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"sharded_kmeans: expected k to be a positive integer, got {k!r}")
    if isinstance(niter, bool) or int(niter) != niter or niter < 0:
        raise ValueError(f"sharded_kmeans: expected niter >= 0, got {niter!r}")
    if init_centroids is not None and tuple(init_centroids.shape) != (k, x_local.shape[1]):
        raise ValueError(f"sharded_kmeans: expected init_centroids of shape ({k}, {x_local.shape[1]}), got "
                         f"{tuple(init_centroids.shape)}")


def sharded_kmeans(x_local: torch.Tensor, k: int, niter: int = 20, seed: int = 0, spherical: bool = False, *,
                   init_centroids: torch.Tensor | None = None, global_index: torch.Tensor | None = None,
                   group=None) -> ShardedKMeansResult:
    """k-means over the rows of every rank, each rank passing its own (n_local, d) rows; see the module docstring.

    init_centroids: (k, d), taken from rank 0 (broadcast); None draws them with `seed` as initial_centroids
    would from the concatenated rows. global_index: (n_local,) global row of each local row (None: contiguous
    shards in rank order).
    """
    _check_kmeans_arguments(x_local, k, niter, init_centroids)
    k = int(k)
    x32 = x_local.detach().to(torch.float32).contiguous()
    shards = _Shards(x32.shape[0], global_index, group, x32.device)
    if shards.total < k:
        raise ValueError(f"sharded_kmeans: need at least as many points as clusters, got N = {shards.total} points "
                         f"over {len(shards.sizes)} ranks for k = {k} clusters; lower k or cluster more points")
    collective = _collective_device(group, x32.device)
    if init_centroids is None:
        centroids = _initial_centroids(x32, k, seed, shards)
    else:
        centroids = init_centroids.detach().to(device=collective, dtype=torch.float32).clone()
        _broadcast_from_first(centroids, group)
        centroids = centroids.to(x32.device)
    if spherical:
        centroids = _normalize_rows(centroids)
    # squared norms a bounded number of rows at a time: (x32 * x32) in one go would be a second whitened shard
    point_sq_norms = squared_row_norms(x32)
    split_generator = torch.Generator().manual_seed(int(seed) + 1)  # the same draws on every rank
    d = x32.shape[1]
    # one all-reduce per iteration: [sums (k*d) | counts (k) | objective | changed labels], float64
    stats = torch.empty(k * d + k + 2, dtype=torch.float64, device=collective)
    objective, splits, labels = [], 0, None
    for _ in range(int(niter)):
        new_labels, distances = kmeans_assign(x32, centroids, point_sq_norms)
        local = stats.zero_() if collective == x32.device else torch.zeros_like(stats, device=x32.device)
        _cluster_sums_float64(x32, new_labels, local[: k * d].view(k, d))
        local[k * d: k * d + k] = torch.bincount(new_labels, minlength=k).to(torch.float64)
        local[-2] = distances.sum(dtype=torch.float64)
        local[-1] = x32.shape[0] if labels is None else (new_labels != labels).sum()
        _all_reduce(stats.copy_(local) if local is not stats else stats, group)
        labels = new_labels
        sums = stats[: k * d].view(k, d).to(device=x32.device, dtype=torch.float32)
        counts = stats[k * d: k * d + k].to(device=x32.device, dtype=torch.int64)
        objective.append(float(stats[-2]))
        nonempty = counts > 0
        centroids = torch.where(nonempty.unsqueeze(1), sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype),
                                torch.zeros_like(sums))
        split_now = split_empty_clusters(centroids, counts, split_generator) if not bool(nonempty.all()) else 0
        splits += split_now
        if spherical:
            centroids = _normalize_rows(centroids)
        if int(stats[-1]) == 0 and split_now == 0:
            break  # the centroids just computed equal the previous ones: every later iteration repeats this one
    labels, _ = kmeans_assign(x32, centroids, point_sq_norms)
    return ShardedKMeansResult(centroids=centroids, labels=labels, objective=objective, iterations=len(objective),
                               splits=splits, sizes=shards.sizes)


def gather_labels(local_labels: torch.Tensor, *, global_index: torch.Tensor | None = None,
                  sizes: list[int] | None = None, group=None) -> torch.Tensor:
    """All ranks' labels as one (N,) int32 tensor in global row order, on every rank (an all_gather of int32).

    sizes: every rank's row count (ShardedKMeansResult.sizes), which saves an all_gather; None asks the ranks.
    """
    if local_labels.dim() != 1:
        raise ValueError(f"gather_labels: expected (n_local,) labels, got shape {tuple(local_labels.shape)}")
    device = local_labels.device
    collective = _collective_device(group, device)
    labels32 = local_labels.to(device=collective, dtype=torch.int32)
    if sizes is None:
        sizes = shard_sizes(labels32.shape[0], group, collective)
    elif len(sizes) != _world(group) or sizes[_rank(group)] != labels32.shape[0]:
        raise ValueError(f"gather_labels: expected sizes to list the {_world(group)} ranks' row counts with "
                         f"{labels32.shape[0]} at this rank's place, got {sizes}")
    pieces = _all_gather_padded(labels32, sizes, group)
    if global_index is None:
        return torch.cat(pieces).to(device)
    if global_index.shape != local_labels.shape:
        raise ValueError(f"gather_labels: expected global_index of shape {tuple(local_labels.shape)} like the labels, "
                         f"got {tuple(global_index.shape)}")
    index_pieces = _all_gather_padded(global_index.to(device=collective, dtype=torch.int64), sizes, group)
    out = torch.empty(sum(sizes), dtype=torch.int32, device=collective)
    out[torch.cat(index_pieces)] = torch.cat(pieces)
    return out.to(device)
