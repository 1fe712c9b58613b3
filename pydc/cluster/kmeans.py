"""k-means as DeepCluster runs it (clustering.py run_kmeans over faiss.Clustering), on any device.

`kmeans(x, k, niter=20, seed=0, backend="auto", spherical=False)`:

1. Initial centroids: k distinct rows of x (indices drawn without replacement with `seed`), or
   `init_centroids` when given. spherical=True L2-normalises them.
2. Up to niter Lloyd iterations. Each assigns every point to its nearest centroid (squared L2, lowest index on
   ties; `objective[i]` is the sum of these squared distances, as faiss's iteration_stats obj), then sets
   every non-empty centroid to the mean of its points, then refills the empty clusters as faiss's
   split_clusters does: for each empty cluster in index order, pick a cluster with probability
   proportional to (size - 1) (sizes are float and halve on a split, so a cluster of one point is never
   picked), copy its centroid into the empty one and perturb both symmetrically, feature j scaled by
   1 + s/1024 for the copy and 1 - s/1024 for the original with s = +1 for even j and -1 for odd j, and
   give each half of the sizes. spherical=True L2-normalises the centroids after every update.
   Fixed-point stop: when an iteration's assignment leaves every label as the previous one did and that
   previous update refilled no empty cluster, the update would reproduce the current centroids bitwise
   (the update is deterministic), so every later iteration would repeat this one: the run stops there,
   with the same centroids, labels and objective values as running all niter iterations (`objective` then
   has one entry per iteration run, `iterations` says how many). stop_at_fixed_point=False runs all niter.
   On CUDA with deterministic=False the float atomics make "bitwise" approximate.
3. Final labels: nearest centroid of the returned centroids (one more assignment pass, unless the run
   stopped at a fixed point, whose labels are already those).

Bounded k-means (bounded=True, the default; CPU with the compiled ops): the assignments skip the points
whose Yinyang bounds prove that their label cannot change (pydc/cluster/kmeans_bounded.py), and once those
bounds stop paying (data without cluster structure) keep every point-centroid product and move it with the
points that changed label (pydc/cluster/kmeans_delta.py); PYDC_KMEANS_BOUNDS=yinyang, elkan (a bound per
point-centroid pair, pydc/cluster/kmeans_elkan.py) or delta forces one of them. The labels, centroids and
splits are exactly those of plain Lloyd (bounded=False); the objective agrees up to float rounding. Without
the compiled ops, bounded=True runs plain Lloyd; on CUDA too, unless PYDC_KMEANS_BOUNDS=yinyang (or portable)
asks for Yinyang's bounds by the kmeans_yinyang_pass op (the CUDA form, compiled and checked through its CPU
twin, not yet run on a GPU): its labels are exact (float64-settled near-ties) in every pass, so they equal
the CPU's plain Lloyd's and may differ from CUDA kmeans_assign's at near-ties.

faiss differences: faiss picks the cluster to split by a cyclic scan with acceptance probability
(size - 1)/(N - k) and a fixed split seed; here it is an exact draw proportional to (size - 1) from a
generator seeded with `seed`. The initial draw uses torch's generator, not faiss's, so `backend="torch"`
and `backend="faiss"` start from different centroids unless `init_centroids` is given.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pydc.cluster.kmeans_bounded import YinyangAssigner, bounded_assignment_available, choose_bounds
from pydc.cluster.kmeans_delta import DeltaAssigner, YinyangThenDelta
from pydc.cluster.kmeans_elkan import ElkanAssigner
from pydc.ops._registry import HAS_OPS
from pydc.ops.cpu_gemm import ensure_cpu_gemm
from pydc.ops.kmeans import kmeans_assign, kmeans_update
from pydc.utils.memory import keep

BACKENDS = ("auto", "torch", "faiss")
SPLIT_EPS = 1.0 / 1024.0


@dataclasses.dataclass
class KMeansResult:
    centroids: torch.Tensor   # (k, d) float32 on x's device
    labels: torch.Tensor      # (N,) int64 on x's device: nearest centroid of `centroids`
    objective: list[float]    # per iteration: sum of squared distances at that iteration's assignment
    backend: str = "torch"    # the backend that ran: "torch", "faiss-cpu" or "faiss-gpu"
    splits: int = 0           # empty clusters refilled over all iterations (torch backend)
    iterations: int = 0       # Lloyd iterations run (< niter when the run stopped at a fixed point)
    bounded: bool = False     # whether the assignments used bounds (torch backend; CUDA: when asked) ...
    bounds: str | None = None  # ... which: "yinyang", "elkan", "delta", their auto chain, or "portable"
    rows_computed: list[int] = dataclasses.field(default_factory=list)  # per assignment pass: points whose
    # distances were computed (all N without bounds; fewer when the bounds settle points)
    scores_computed: list[int] = dataclasses.field(default_factory=list)  # per assignment pass: point-centroid
    # scores computed (N * k without bounds; fewer when the bounds settle points or groups of centroids)
    cpu_gemm: str | None = None  # the BLAS of the CPU score GEMMs, "torch" or "scipy" (pydc.ops.cpu_gemm);
    # None off the CPU, without the compiled ops, or for faiss


def _faiss_module():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _check_arguments(x, k: int, niter: int, backend: str, init_centroids) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"kmeans: expected x to be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"kmeans: expected x of shape (N, d), got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"kmeans: expected floating point x, got {x.dtype}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"kmeans: expected k to be a positive integer, got {k!r}")
    if x.shape[0] < k:
        raise ValueError(f"kmeans: need at least as many points as clusters, got N = {x.shape[0]} points for "
                         f"k = {k} clusters; lower k or cluster more points")
    if x.shape[1] < 1:
        raise ValueError(f"kmeans: expected points with at least one feature, got x of shape {tuple(x.shape)}")
    if int(niter) != niter or niter < 0:
        raise ValueError(f"kmeans: expected niter >= 0, got {niter!r}")
    if backend not in BACKENDS:
        raise ValueError(f"kmeans: expected backend in {BACKENDS}, got {backend!r}")
    if init_centroids is not None and tuple(init_centroids.shape) != (k, x.shape[1]):
        raise ValueError(f"kmeans: expected init_centroids of shape ({k}, {x.shape[1]}), got "
                         f"{tuple(init_centroids.shape)}")


def initial_centroids(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k distinct rows of x, drawn without replacement by a CPU generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(int(seed))
    index = torch.randperm(x.shape[0], generator=generator)[:k].to(x.device)
    return x.index_select(0, index).clone()


NORM_CHUNK_ROWS = 8192


def squared_row_norms(x: torch.Tensor) -> torch.Tensor:
    """(x * x).sum(1) of a float32 (N, d) x, NORM_CHUNK_ROWS rows at a time (each row's sum as in one go): no
    N x d temporary. Written in one go, its fresh 100 MB at 100k x 256 page-faulted ~30 ms into every k-means
    run (AMD EPYC Zen 4; 5 ms chunked)."""
    norms = x.new_empty(x.shape[0])
    for chunk, out in zip(x.split(NORM_CHUNK_ROWS), norms.split(NORM_CHUNK_ROWS)):
        torch.sum(chunk * chunk, dim=1, out=out)
    return norms


def _normalize_rows(centroids: torch.Tensor) -> torch.Tensor:
    norms = centroids.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, centroids / norms.clamp_min(torch.finfo(torch.float32).tiny), centroids)


def split_empty_clusters(centroids: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> int:
    """Refill the empty clusters in place by splitting others (faiss's split_clusters); returns how many."""
    sizes = counts.to(device="cpu", dtype=torch.float64)
    empty = torch.nonzero(sizes == 0).flatten().tolist()
    if not empty:
        return 0
    d = centroids.shape[1]
    sign = torch.ones(d, dtype=centroids.dtype, device=centroids.device)
    sign[1::2] = -1.0
    grow, shrink = 1.0 + SPLIT_EPS * sign, 1.0 - SPLIT_EPS * sign
    for ci in empty:
        weights = (sizes - 1.0).clamp_min(0.0)
        cj = int(torch.multinomial(weights, 1, generator=generator))
        centroids[ci] = centroids[cj] * grow
        centroids[cj] *= shrink
        sizes[ci] = sizes[cj] / 2.0
        sizes[cj] -= sizes[ci]
    return len(empty)


class _PlainAssigner:
    """One kmeans_assign pass over all points per call: (labels, objective)."""

    def __init__(self, x: torch.Tensor, point_sq_norms: torch.Tensor):
        self.x, self.point_sq_norms = x, point_sq_norms

    def __call__(self, centroids: torch.Tensor) -> tuple[torch.Tensor, float]:
        labels, distances = kmeans_assign(self.x, centroids, self.point_sq_norms)
        return labels, float(distances.sum(dtype=torch.float64))


def _update(x32, labels, k, deterministic, previous_labels, previous_sums):
    """kmeans_update's (sums, counts) for these labels. After the first iteration only the clusters that some
    point joined or left are summed again: the others hold the same points, so their sums (each cluster's
    rows in point order, in float64) are the previous ones bit for bit. Late in an unstructured 100k x 256,
    k = 1000 run, 51-455 points change label per iteration and 10-60% of the clusters are summed (an update
    took 8-10 ms for all of them, on 2 threads of an AMD EPYC Zen 4)."""
    if previous_labels is None or x32.device.type != "cpu":
        return kmeans_update(x32, labels, k, deterministic=deterministic)
    moved = labels != previous_labels
    touched = torch.zeros(k, dtype=torch.bool)
    touched[labels[moved]] = True
    touched[previous_labels[moved]] = True
    sums, counts = kmeans_update(x32, labels, k, deterministic=deterministic, clusters=touched)
    return torch.where(touched.unsqueeze(1), sums, previous_sums), counts


def _kmeans_torch(x, k, niter, seed, spherical, init_centroids, deterministic, bounded,
                  stop_at_fixed_point) -> KMeansResult:
    x32 = x.detach().to(torch.float32).contiguous()
    centroids = (initial_centroids(x32, k, seed) if init_centroids is None
                 else init_centroids.detach().to(device=x.device, dtype=torch.float32).clone())
    if spherical:
        centroids = _normalize_rows(centroids)
    point_sq_norms = squared_row_norms(x32)
    bounded = bounded and bounded_assignment_available(x32)
    cpu_gemm = ensure_cpu_gemm() if HAS_OPS and x32.device.type == "cpu" else None
    bounds = choose_bounds(x32.shape[0], k, spherical, x32.device.type) if bounded else None
    if bounds == "delta":
        assign = DeltaAssigner(x32, point_sq_norms, k)
    elif bounds == "elkan":
        assign = ElkanAssigner(x32, point_sq_norms, k)
    elif bounds == "portable":
        assign = YinyangAssigner(x32, point_sq_norms, k, group_seed=int(seed) + 2, portable=True)
    elif bounds in ("yinyang", "auto"):
        assign = YinyangAssigner(x32, point_sq_norms, k, group_seed=int(seed) + 2)
        if bounds == "auto":
            assign = YinyangThenDelta(assign, x32, point_sq_norms, k)
    else:
        assign = _PlainAssigner(x32, point_sq_norms)
    try:
        split_generator = torch.Generator().manual_seed(int(seed) + 1)
        objective, splits = [], 0
        previous_labels, previous_split, previous_sums = None, True, None
        stopped = False
        for _ in range(int(niter)):
            labels, iteration_objective = assign(centroids)
            objective.append(iteration_objective)
            if (stop_at_fixed_point and previous_labels is not None and not previous_split
                    and torch.equal(labels, previous_labels)):
                stopped = True  # the update would give these centroids again: a fixed point (module docstring)
                break
            sums, counts = _update(x32, labels, k, deterministic, previous_labels, previous_sums)
            previous_sums = sums
            nonempty = counts > 0
            centroids = torch.where(nonempty.unsqueeze(1), sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype),
                                    torch.zeros_like(sums))
            previous_split = not bool(nonempty.all())
            if previous_split:
                splits += split_empty_clusters(centroids, counts, split_generator)
            if spherical:
                centroids = _normalize_rows(centroids)
            previous_labels = labels
        if not stopped:  # the final labels are one more assignment
            labels, _ = assign(centroids)
    finally:  # a bounded run's N x k state, for the next run of this size (pydc.utils.memory)
        release = getattr(assign, "release", None)
        keep(release() if release is not None else None)
    passes = len(objective) + (not stopped)
    rows_computed = assign.rows_computed if bounded else [x32.shape[0]] * passes
    scores_computed = assign.scores_computed if bounded else [x32.shape[0] * k] * passes
    if bounds == "auto":
        bounds = assign.used
    return KMeansResult(centroids=centroids, labels=labels, objective=objective, backend="torch", splits=splits,
                        iterations=len(objective), bounded=bounded, bounds=bounds, rows_computed=rows_computed,
                        scores_computed=scores_computed, cpu_gemm=cpu_gemm)


def _kmeans_faiss(faiss, x, k, niter, seed, spherical, init_centroids) -> KMeansResult:
    x_np = np.ascontiguousarray(x.detach().to(device="cpu", dtype=torch.float32).numpy())
    n, d = x_np.shape
    clustering = faiss.Clustering(d, k)
    clustering.niter = int(niter)
    # faiss's seed is a C int; pydc.train's epoch seeds (seed * 1_000_003 + epoch) exceed it from --seed 2148 on.
    clustering.seed = int(seed) % 2**31
    clustering.spherical = bool(spherical)
    clustering.max_points_per_centroid = 10_000_000  # DeepCluster: no subsampling
    clustering.verbose = False
    if init_centroids is not None:
        faiss.copy_array_to_vector(
            np.ascontiguousarray(init_centroids.detach().cpu().to(torch.float32).numpy()).ravel(), clustering.centroids)
    use_gpu = x.is_cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu:
        resources = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.device = x.device.index or 0
        index = faiss.GpuIndexFlatL2(resources, d, config)
    else:
        index = faiss.IndexFlatL2(d)
    clustering.train(x_np, index)
    centroids = faiss.vector_float_to_array(clustering.centroids).reshape(k, d)
    stats = clustering.iteration_stats
    objective = [float(stats.at(i).obj) for i in range(stats.size())]
    index.reset()
    index.add(centroids)
    _, labels = index.search(x_np, 1)
    return KMeansResult(centroids=torch.from_numpy(centroids.copy()).to(x.device),
                        labels=torch.from_numpy(labels.reshape(-1).astype(np.int64)).to(x.device),
                        objective=objective, backend="faiss-gpu" if use_gpu else "faiss-cpu",
                        iterations=len(objective))


# backend="auto" on the CPU: pydc's bounded k-means from this many multiply-adds per assignment (N x k x d) up,
# faiss-cpu (when installed) below. Measured, 20 iterations, both with their fixed-point stops, pydc / faiss
# time on AMD EPYC (family 23, Zen 1, AVX2, 2 threads): 100k x 256, k = 1000: 0.35 (clustered), 0.76
# (unstructured); 50k x 256, k = 1000, clustered: 0.35; 10k x 256, k = 300, unstructured: 0.91; 10k x 64,
# k = 300, clustered: 0.64. Below, pydc's per-iteration Python costs lead: 1797 x 64, k = 56 (the digits'
# trainer): 10.0 vs 8.5 ms; 1797 x 32, k = 10: 10.5 vs 3.4 ms. 2^25 lies between the two groups.
AUTO_PYDC_MIN_WORK = 1 << 25


def auto_uses_faiss(x: torch.Tensor, k: int) -> bool:
    """Whether backend="auto" hands x to faiss (when faiss is importable): on the CPU, without pydc's compiled
    bounded k-means or below AUTO_PYDC_MIN_WORK multiply-adds per assignment."""
    if x.is_cuda:
        return False
    return not bounded_assignment_available(x) or x.shape[0] * k * x.shape[1] < AUTO_PYDC_MIN_WORK


def kmeans(x: torch.Tensor, k: int, niter: int = 20, seed: int = 0, backend: str = "auto", spherical: bool = False,
           *, init_centroids: torch.Tensor | None = None, deterministic: bool = True, bounded: bool = True,
           stop_at_fixed_point: bool = True) -> KMeansResult:
    """Cluster the rows of x into k clusters; see the module docstring for the exact semantics.

    backend: "torch" runs pydc's ops on x's device; "faiss" runs faiss (faiss-gpu for CUDA tensors when it
    is installed, faiss-cpu otherwise); "auto" runs pydc's ops on CUDA, and on the CPU too when the compiled
    ops are loaded and one assignment is at least AUTO_PYDC_MIN_WORK multiply-adds (N x k x d); below that, or
    without the compiled ops, faiss-cpu when it is importable (see auto_uses_faiss). deterministic selects
    the bitwise reproducible centroid update on CUDA (the CPU update always is).
    """
    _check_arguments(x, k, niter, backend, init_centroids)
    k = int(k)
    faiss = _faiss_module() if backend in ("faiss", "auto") else None
    if backend == "faiss" and faiss is None:
        raise ValueError("kmeans: backend='faiss' needs the faiss package (pip install faiss-cpu), which is not "
                         "importable; use backend='torch' for pydc's own k-means")
    if backend == "faiss" or (backend == "auto" and faiss is not None and auto_uses_faiss(x, k)):
        return _kmeans_faiss(faiss, x, k, niter, seed, spherical, init_centroids)
    return _kmeans_torch(x, k, niter, seed, spherical, init_centroids, deterministic, bounded, stop_at_fixed_point)
