"""The two steps of a Lloyd iteration as ops: `torch.ops.pydc.kmeans_assign` and `torch.ops.pydc.kmeans_update`.

kmeans_assign(x, centroids, x_sq_norms=None, allow_tf32=True) -> (labels, distances)
    x (N, d) and centroids (k, d) are float32 on the same device. For every point, the centroid with the
    smallest squared L2 distance: labels (N,) int64 and distances (N,) float32. The distance is expanded as
    ||x||^2 + (||c||^2 - 2 x.c); the arg-min is taken over the score ||c||^2 - 2 x.c, ties go to the lowest
    centroid index, and the distance is clamped at 0 (rounding can make the expansion slightly negative for a
    point equal to its centroid), as faiss does. x_sq_norms, when given, are the rows' squared norms (saved
    across iterations; they are recomputed otherwise). The N x k distance matrix is never formed: the CPU
    kernel gives every thread its own 256 x 1024 BLAS blocks (torch's or scipy's BLAS, whichever is faster
    where it runs: pydc.ops.cpu_gemm), folded into a running best and second best while in that core's cache;
    the CUDA kernel bounds its
    cuBLAS workspace to half the device's L2 cache, so the dot products are read back from L2, not HBM.
    CPU labels are exact: a row whose float32 best and second best lie closer than twice a proven bound on
    the float32 error of the scores (common/kmeans_math.h) is settled by fixed-order float64 scores, so the
    label is the arg-min of the exact distances (ties to the lowest index) whatever the BLAS, ISA level or
    thread count; this is what lets bounded k-means skip rows and keep Lloyd's labels. On CUDA with
    allow_tf32 the dot products are computed with TF32 tensor cores only to rank the 4 best candidates of
    each point, which are then re-scored in fp32: the labels are those of fp32 arithmetic unless the nearest
    centroid is not among the TF32 top 4 (a gap below TF32's ~1e-3 relative error across 4 centroids).
    allow_tf32=False computes them in fp32 whatever torch's global TF32 flag says (the CUDA kernel fetches
    cuBLAS's handle under at::NoTF32Guard). The CPU always computes in fp32 (float64 for the settled rows).
    The inner loops run at the CPU's ISA level (pydc.ops.cpu_capability).

kmeans_update(x, labels, k, deterministic=True, clusters=None) -> (sums, counts)
    sums (k, d) float32: the sum of the rows of x with each label; counts (k,) int64: how many. The new
    centroid of a non-empty cluster is sums / counts. clusters, (k,) bool: only the flagged clusters' sums
    are computed, the others' rows are 0 (the counts are all computed): a Lloyd iteration recomputes only
    the clusters some point joined or left, the others' sums being the same as before, bit for bit. The CPU
    kernel always sums every cluster's rows in point order in float64 (deterministic whatever the thread
    count) and rejects labels outside [0, k). On
    CUDA, deterministic=True sorts the points by label and sums in a fixed order in float64 (bitwise
    reproducible); deterministic=False uses float atomics (faster, last bits vary run to run). The CUDA
    kernels skip labels outside [0, k), since checking them would need a device-to-host sync.

kmeans_assign_yinyang (one pass of bounded k-means: global and local Yinyang filter, updating labels and
group bounds in place), kmeans_assign_bounds (a full pass that also returns the bounds) and
kmeans_label_distances (float64 distance to the own centroid) are CPU only; see
csrc/ops/cpu/kmeans_yinyang_kernel.cpp, kmeans_bounded_kernel.cpp and pydc/cluster/kmeans_bounded.py. So is
kmeans_assign_elkan (one pass with a lower bound per point and centroid, labels and bounds updated in place;
csrc/ops/cpu/kmeans_elkan_kernel.cpp, pydc/cluster/kmeans_elkan.py) and kmeans_assign_delta (the products of every
point and centroid moved to new centroids by the points that changed label; kmeans_delta_kernel.cpp,
pydc/cluster/kmeans_delta.py), and kmeans_assign_bf16 / kmeans_assign_bounds_bf16 (kmeans_assign's labels, and
kmeans_assign_bounds's bounds, from a bfloat16 GEMM of MKL's that only screens the centroids, the candidates
settled in float64; kmeans_bf16_kernel.cpp).

kmeans_yinyang_pass(x, centroids, centroid_ids, group_offsets, x_sq_norms, group_drift, refresh, labels,
group_lower) -> (distances, upper, counts) is one pass of bounded k-means on the CPU or CUDA, one point per
thread (CPU) or per warp (CUDA) running the same code (csrc/common/kmeans_yinyang_pass.h): refresh=True scores
every centroid (kmeans_assign_bounds' labels and group bounds, written into labels and group_lower), False
filters by the bounds in group_lower decayed by group_drift and by the centroids' separation, per group
(kmeans_assign_yinyang's labels and bounds; its separation filter also works per block of 8 centroids). distances (N,) float64, upper (N,) float64 >= the distance to the new label's
centroid, counts = (points scored, scores computed). Labels are exact (float64-settled) on both devices, also
on CUDA, where they may differ from kmeans_assign's at near-ties. Bounded k-means runs it on CUDA
(pydc/cluster/kmeans_bounded.py); on the CPU it runs the faster CPU-only ops above and this op's CPU kernel is
the check of the GPU's arithmetic.

Neither op has a gradient (the assignment is piecewise constant). `kmeans_assign_reference` and
`kmeans_update_reference` are the semantics in plain torch: the test oracles and the fallback when the
compiled library is missing.
"""

from __future__ import annotations

import torch

from pydc.ops._registry import HAS_OPS, warn_fallback
from pydc.ops.cpu_gemm import ensure_cpu_gemm

_REFERENCE_CHUNK_ROWS = 4096


def _check_assign(x: torch.Tensor, centroids: torch.Tensor, x_sq_norms: torch.Tensor | None) -> None:
    for name, t in (("x", x), ("centroids", centroids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"kmeans_assign: expected {name} to be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"kmeans_assign: expected {name} to be a 2-D tensor, got shape {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"kmeans_assign: expected {name} of dtype torch.float32, got {t.dtype}")
    if x.device != centroids.device:
        raise ValueError(f"kmeans_assign: expected x and centroids on the same device, got x on {x.device} and "
                         f"centroids on {centroids.device}")
    if x.shape[1] < 1:
        raise ValueError(f"kmeans_assign: expected points with at least one feature, got x of shape {tuple(x.shape)}")
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(f"kmeans_assign: expected centroids of shape (k, {x.shape[1]}) to match x of shape "
                         f"{tuple(x.shape)}, got centroids of shape {tuple(centroids.shape)}")
    if centroids.shape[0] < 1:
        raise ValueError(f"kmeans_assign: expected at least one centroid, got centroids of shape "
                         f"{tuple(centroids.shape)}")
    if x_sq_norms is not None:
        if x_sq_norms.shape != (x.shape[0],) or x_sq_norms.dtype != torch.float32 or x_sq_norms.device != x.device:
            raise ValueError(f"kmeans_assign: expected x_sq_norms to be a float32 tensor of shape ({x.shape[0]},) "
                             f"on {x.device}, got {x_sq_norms.dtype} of shape {tuple(x_sq_norms.shape)} on "
                             f"{x_sq_norms.device}")


def _check_update(x: torch.Tensor, labels: torch.Tensor, k: int,
                  clusters: torch.Tensor | None = None) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("kmeans_update: expected x and labels to be torch.Tensors")
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"kmeans_update: expected x to be a 2-D float32 tensor, got {x.dtype} of shape "
                         f"{tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"kmeans_update: expected points with at least one feature, got x of shape {tuple(x.shape)}")
    if labels.shape != (x.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"kmeans_update: expected labels to be an int64 tensor of shape ({x.shape[0]},) (one label "
                         f"per row of x), got {labels.dtype} of shape {tuple(labels.shape)}")
    if labels.device != x.device:
        raise ValueError(f"kmeans_update: expected x and labels on the same device, got x on {x.device} and labels "
                         f"on {labels.device}")
    if int(k) < 1:
        raise ValueError(f"kmeans_update: expected k >= 1 clusters, got k = {k}")
    if clusters is not None and (not isinstance(clusters, torch.Tensor) or clusters.dtype != torch.bool
                                 or clusters.shape != (int(k),) or clusters.device != x.device):
        got = getattr(clusters, "dtype", type(clusters).__name__)
        raise ValueError(f"kmeans_update: expected clusters to be a bool tensor of shape ({int(k)},) on "
                         f"{x.device} (one flag per cluster), got {got} of shape "
                         f"{tuple(getattr(clusters, 'shape', ()))}")


def kmeans_assign_reference(x: torch.Tensor, centroids: torch.Tensor, x_sq_norms: torch.Tensor | None = None,
                            compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and clamped squared distance by chunks of torch matmul + argmin (first index on ties)."""
    xc = x.to(compute_dtype)
    cc = centroids.to(compute_dtype)
    centroid_sq_norms = (cc * cc).sum(1)
    point_sq_norms = (xc * xc).sum(1) if x_sq_norms is None else x_sq_norms.to(compute_dtype)
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    distances = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], _REFERENCE_CHUNK_ROWS):
        stop = min(start + _REFERENCE_CHUNK_ROWS, x.shape[0])
        scores = centroid_sq_norms.unsqueeze(0) - 2.0 * (xc[start:stop] @ cc.T)
        best, index = scores.min(dim=1)  # torch returns the first minimal index
        labels[start:stop] = index
        distances[start:stop] = (point_sq_norms[start:stop] + best).clamp_min(0.0).to(torch.float32)
    return labels, distances


def kmeans_update_reference(x: torch.Tensor, labels: torch.Tensor, k: int,
                            clusters: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums (accumulated in float64, returned as float32; zero for the clusters not flagged in
    `clusters`) and counts."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"kmeans_update: expected labels in [0, k) = [0, {k}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    sums = torch.zeros((k, x.shape[1]), dtype=torch.float64, device=x.device)
    sums.index_add_(0, labels, x.to(torch.float64))
    counts = torch.bincount(labels, minlength=k)
    if clusters is not None:
        sums.masked_fill_(~clusters.unsqueeze(1), 0.0)
    return sums.to(torch.float32), counts


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, x_sq_norms: torch.Tensor | None = None,
                  allow_tf32: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every point and its squared distance; see the module docstring."""
    _check_assign(x, centroids, x_sq_norms)
    if not HAS_OPS:
        warn_fallback("kmeans_assign")
        return kmeans_assign_reference(x, centroids, x_sq_norms)
    if x.device.type == "cpu":
        ensure_cpu_gemm()
    return torch.ops.pydc.kmeans_assign(x, centroids, x_sq_norms, allow_tf32)


def kmeans_update(x: torch.Tensor, labels: torch.Tensor, k: int, deterministic: bool = True,
                  clusters: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums (of the flagged clusters, given `clusters`) and counts of the points; see the module
    docstring."""
    _check_update(x, labels, k, clusters)
    if not HAS_OPS:
        warn_fallback("kmeans_update")
        return kmeans_update_reference(x, labels, int(k), clusters)
    return torch.ops.pydc.kmeans_update(x, labels, int(k), deterministic, clusters)


if HAS_OPS:

    @torch.library.register_fake("pydc::kmeans_assign")
    def _kmeans_assign_fake(x, centroids, x_sq_norms=None, allow_tf32=True):
        torch._check(x.dim() == 2 and centroids.dim() == 2, lambda: "kmeans_assign: expected 2-D x and centroids")
        torch._check(x.dtype == torch.float32 and centroids.dtype == torch.float32,
                     lambda: f"kmeans_assign: expected float32 x and centroids, got {x.dtype} and {centroids.dtype}")
        torch._check(x.shape[1] == centroids.shape[1],
                     lambda: f"kmeans_assign: feature sizes differ, x {x.shape[1]} vs centroids {centroids.shape[1]}")
        torch._check(centroids.shape[0] >= 1, lambda: "kmeans_assign: expected at least one centroid")
        n = x.shape[0]
        return x.new_empty((n,), dtype=torch.int64), x.new_empty((n,), dtype=torch.float32)

    # The CPU-only ops of bounded k-means (pydc.cluster.kmeans_bounded): shapes and dtypes for torch.compile.
    @torch.library.register_fake("pydc::kmeans_assign_bounds")
    def _kmeans_assign_bounds_fake(x, centroids, centroid_ids, group_offsets, x_sq_norms):
        torch._check(x.dim() == 2 and centroids.dim() == 2 and x.shape[1] == centroids.shape[1],
                     lambda: "kmeans_assign_bounds: expected 2-D x and centroids of the same width")
        torch._check(group_offsets.dim() == 1 and group_offsets.shape[0] >= 2,
                     lambda: "kmeans_assign_bounds: expected group_offsets of G + 1 >= 2 entries")
        n, groups = x.shape[0], group_offsets.shape[0] - 1
        return (x.new_empty((n,), dtype=torch.int64), x.new_empty((n,), dtype=torch.float32),
                x.new_empty((n,), dtype=torch.float64), x.new_empty((n, groups), dtype=torch.float64))

    @torch.library.register_fake("pydc::kmeans_label_distances")
    def _kmeans_label_distances_fake(x, centroids, labels):
        torch._check(x.dim() == 2 and labels.dim() == 1 and labels.shape[0] == x.shape[0],
                     lambda: "kmeans_label_distances: expected 2-D x and one label per row")
        return x.new_empty((x.shape[0],), dtype=torch.float64)

    @torch.library.register_fake("pydc::kmeans_assign_yinyang")
    def _kmeans_assign_yinyang_fake(x, centroids, centroid_ids, group_offsets, x_sq_norms, group_drift, labels,
                                    group_lower):
        torch._check(x.dim() == 2 and labels.dim() == 1 and labels.shape[0] == x.shape[0],
                     lambda: "kmeans_assign_yinyang: expected 2-D x and one label per row")
        # labels and group_lower are updated in place (schema a!/b!); the outputs are new tensors.
        return x.new_empty((x.shape[0],), dtype=torch.float64), x.new_empty((2,), dtype=torch.int64)

    @torch.library.register_fake("pydc::kmeans_yinyang_pass")
    def _kmeans_yinyang_pass_fake(x, centroids, centroid_ids, group_offsets, x_sq_norms, group_drift, refresh,
                                  labels, group_lower):
        torch._check(x.dim() == 2 and labels.dim() == 1 and labels.shape[0] == x.shape[0],
                     lambda: "kmeans_yinyang_pass: expected 2-D x and one label per row")
        # labels and group_lower are written in place (schema a!/b!); the outputs are new tensors.
        n = x.shape[0]
        return (x.new_empty((n,), dtype=torch.float64), x.new_empty((n,), dtype=torch.float64),
                x.new_empty((2,), dtype=torch.int64))

    @torch.library.register_fake("pydc::kmeans_assign_elkan")
    def _kmeans_assign_elkan_fake(x, centroids, x_sq_norms, drift_offsets, max_drift, dense_fraction, labels,
                                  anchors, second):
        torch._check(x.dim() == 2 and labels.dim() == 1 and labels.shape[0] == x.shape[0],
                     lambda: "kmeans_assign_elkan: expected 2-D x and one label per row")
        # labels, anchors and second are updated in place (schema a!/b!/c!); the outputs are new tensors.
        return x.new_empty((x.shape[0],), dtype=torch.float64), x.new_empty((3,), dtype=torch.int64)

    @torch.library.register_fake("pydc::kmeans_assign_delta")
    def _kmeans_assign_delta_fake(x, centroids, x_sq_norms, dense_changes, labels, dots, column_error, basis_labels,
                                  basis_centroids, tops, packed_x=None):
        torch._check(x.dim() == 2 and labels.dim() == 1 and labels.shape[0] == x.shape[0],
                     lambda: "kmeans_assign_delta: expected 2-D x and one label per row")
        # labels, dots, column_error, basis_labels, basis_centroids, tops, packed_x: updated in place (a!-g!)
        return x.new_empty((x.shape[0],), dtype=torch.float64), x.new_empty((3,), dtype=torch.int64)

    @torch.library.register_fake("pydc::kmeans_assign_bf16")
    def _kmeans_assign_bf16_fake(x, x_bf16, centroids, x_sq_norms):
        torch._check(x.dim() == 2 and x_bf16.shape == x.shape, lambda: "kmeans_assign_bf16: expected 2-D x and "
                     "x_bf16 of its shape")
        return x.new_empty((x.shape[0],), dtype=torch.int64), x.new_empty((x.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("pydc::kmeans_assign_bounds_bf16")
    def _kmeans_assign_bounds_bf16_fake(x, x_bf16, centroids, centroid_ids, group_offsets, x_sq_norms):
        torch._check(x_bf16.shape == x.shape, lambda: "kmeans_assign_bounds_bf16: expected x_bf16 of x's shape")
        return _kmeans_assign_bounds_fake(x, centroids, centroid_ids, group_offsets, x_sq_norms)

    @torch.library.register_fake("pydc::kmeans_update")
    def _kmeans_update_fake(x, labels, k, deterministic=True, clusters=None):
        torch._check(x.dim() == 2 and x.dtype == torch.float32, lambda: "kmeans_update: expected 2-D float32 x")
        torch._check(labels.dim() == 1 and labels.dtype == torch.int64, lambda: "kmeans_update: expected int64 labels")
        torch._check(labels.shape[0] == x.shape[0], lambda: "kmeans_update: expected one label per row of x")
        torch._check(k >= 1, lambda: f"kmeans_update: expected k >= 1, got {k}")
        return x.new_empty((k, x.shape[1]), dtype=torch.float32), x.new_empty((k,), dtype=torch.int64)
