"""Bounded (Yinyang) assignment for pydc's CPU k-means: Lloyd's labels, with the point-centroid scores
skipped that provably cannot change a label.

Yinyang k-means (Ding et al., ICML 2015) keeps, per point, an upper bound u on the distance to its own
centroid and a lower bound l_g on the distance to every other centroid of each group g of centroids (the
groups: a small k-means of the initial centroids, then filled nearest-first to 16 centroids each, at most 64
groups: group_layout). When the
centroids move by drift_j, the bounds stay valid as u + drift_own and l_g - max_{j in g} drift_j. Each pass
(one kmeans_assign_yinyang call, csrc/ops/cpu/kmeans_yinyang_kernel.cpp) applies three filters: the global
one, a point whose own centroid is provably nearer than every group's lower bound keeps its label with no
score computed; the local one, for the other points only the groups whose bound fails (and the own
centroid's group) are scored, in blocks of 8 transposed centroids per group. A third filter uses the
centroids' separation (Elkan, ICML 2003): d(x, j) >= d(c, j) - u for the own centroid c, so with the k x k
centroid distances of the pass (one float64 Gram matrix, bounded from below per block of 8 and per group) a
group or block at least 2u (plus the margin below) from c is not scored either; this is what settles the
points of a true cluster while the centroids still move too much for the drift-decayed bounds (clustered
data). Near-ties are settled in float64 among the scored centroids within the error margin of the best,
not against all k (the points halfway between clusters have many). The first pass scores everything with
kmeans_assign_bounds (BLAS GEMM + group-min fold: 0.77 s against 0.90 s for the local filter from zero
bounds, 100k x 256, k = 1000, 2 threads, Zen 4), which sets the bounds. When a pass scores more than
DENSE_FRACTION of all point-centroid pairs (early iterations, unstructured data), the next 1, 2, 4 or 8
passes (after successive such passes) run plain kmeans_assign (BLAS GEMM: faster than the block scoring when
nearly everything is scored); the last of them refreshes the bounds the same way.

Exactness. pydc's labels are the exact arg-min of the squared distance (kmeans_cpu.h: float32 candidates,
float64 settle of near-ties, ties to the lowest index), so they do not depend on which scores are computed
together. A group is skipped only when l_g^2 - u^2 > 2 * kmeans_score_error_bound (the same margin that
decides a float64 settle), so every skipped centroid is farther than the own one and the exact arg-min is
among the scored ones; u is recomputed exactly every pass (fixed-order float64 distance to the own centroid,
rounded up), the drifts are float64 norms of float32 differences rounded up, and the group lower bounds that
the kernel stores already subtract the float32 error of the scores they come from. The separation filter skips
a group or block only when (s - u)^2 - u^2 > 2 * kmeans_score_error_bound, where s is a lower bound on the
distance from c to the group's or block's nearest other member (the float64 Gram matrix's error, 4 (d + 4)
2^-53 (||c||^2 + ||c_j||^2), taken off before a downward-rounded root), so again every skipped centroid is
farther than the own one; a group it drops keeps max(decayed bound, s - u), a partly skipped group's refreshed
bound is min(scored members' bound, s - u), both valid for every member. A near-tie settle needs only the
scored centroids whose float32 score is within 2 * bound of the best: any other one is provably farther (by at
least 2% of the bound, the bound's 1% slack, far above float64 rounding), so the fixed-order float64 arg-min
(ties to the lowest index) over those is kmeans_assign's. So the labels are the ones kmeans_assign would
return, and the iteration's centroids are bitwise those of plain Lloyd: an empty-cluster split or a spherical
renormalisation moves centroids like any update, and the drift is measured after it. The objective of a
skipped point is its float64 distance, of a scored one the kernel's float32 distance: the sum agrees with
plain Lloyd's up to float rounding (~1e-7 relative).

CUDA form (built, compiled here for sm_90; no GPU has run it yet): kmeans_yinyang_pass, one op for both
devices whose per-point code is csrc/common/kmeans_yinyang_pass.h, run by one CPU thread per point (the CPU
kernel, which the tests run: PYDC_KMEANS_BOUNDS=portable) or one warp per point (ops/cuda/kmeans_kernel.cu).
The state stays on the device: labels (N) int64, group_lower (N, G) float64 (1.28M x 64 x 8 bytes = 655 MB at
most), the groups' layout (from the CPU, k values). A refresh pass takes whole rows of fp32 dot products
from cuBLAS (no TF32: the error bound is fp32's) in an L2-sized workspace and each warp folds its row into
the group minima and the top-2; a filtered pass decays the bounds, takes u as the fixed-order float64
distance to the own centroid (the CPU kernels' bits), drops the groups that the bounds or the centroids'
separation settle (a k x G table per pass from the float64 Gram matrix, cuBLAS DGEMM: the per-group form of
the CPU kernel's filter), and scores the rest lane by lane (centroids transposed so that the 32 lanes read
consecutive addresses), settling near-ties in float64 among them. The
labels are therefore exact, as on the CPU, and the whole run equals the CPU's plain Lloyd up to the update's
float64 summation order (CUDA's deterministic kmeans_update sums in another order than the CPU's); they may
differ from CUDA kmeans_assign's TF32-ranked labels at near-ties, which is why YinyangAssigner's full passes
on CUDA are refreshes, not kmeans_assign. Left for a GPU to measure first: a filtered pass compacting its
active rows into a cuBLAS GEMM (the design of the refresh, for the early passes that score most groups), the
separation filter per block of 8 centroids, and whether CUDA's default should become bounded.
"""

from __future__ import annotations

import os

import torch

from pydc.ops.bf16_screen import ScreenedPoints

MAX_GROUPS = 64
CENTROIDS_PER_GROUP = 16
DENSE_FRACTION = 0.7  # above this fraction of scores computed, the next passes score all of them ...
MAX_BACKOFF = 8       # ... and the next 1, 2, 4, 8 passes (after successive such filters) skip the filter
_ROUND_UP = 1.0 + 1e-12  # float64 norms and square roots of float32 data: relative error far below 1e-12


ELKAN_MAX_BYTES = 1 << 30  # per-pair bounds (kmeans_elkan.py): N x k x 4 bytes at most 1 GiB
# kmeans_assign_delta's packed_x: N rounded up to MAX_GEMM_PANEL times d floats and a header of PACKED_HEADER
# (kMaxGemmPanel in csrc/ops/cpu/blas_gemm.h, kPackedHeader in csrc/ops/cpu/kmeans_delta_kernel.cpp).
MAX_GEMM_PANEL = 32
PACKED_HEADER = 8


def packed_points_floats(n: int, d: int) -> int:
    """Floats of kmeans_assign_delta's packed_x for n points of d features."""
    return -(-n // MAX_GEMM_PANEL) * MAX_GEMM_PANEL * d + PACKED_HEADER


def pair_state_floats(n: int, k: int, d: int) -> int:
    """Floats of the memory that Elkan's bounds and then delta's products take in one run (handed from one to
    the other, and kept for the next run: pydc.utils.memory): N x k, plus delta's packed points
    (packed_points_floats, a copy of x: N x d) where pydc's own GEMM multiplies them (pydc.ops.cpu_gemm chose
    it) and they fit ELKAN_MAX_BYTES too; without them the moved passes pack their points each pass."""
    from pydc.ops.cpu_gemm import ensure_cpu_gemm

    packed = packed_points_floats(n, d)
    packs = packed * 4 <= ELKAN_MAX_BYTES and ensure_cpu_gemm() == "pydc"
    return n * k + (packed if packs else 0)


BOUNDS_CHOICES = ("auto", "delta", "elkan", "yinyang", "portable")


def requested_bounds() -> str:
    """PYDC_KMEANS_BOUNDS, checked (choose_bounds)."""
    requested = os.environ.get("PYDC_KMEANS_BOUNDS", "auto").strip().lower() or "auto"
    if requested not in BOUNDS_CHOICES:
        raise ValueError(f"PYDC_KMEANS_BOUNDS must be one of {', '.join(BOUNDS_CHOICES)}, got {requested!r}")
    return requested


def choose_bounds(n: int, k: int, spherical: bool = False, device: str = "cpu") -> str:
    """The assigner of a bounded CPU k-means run, PYDC_KMEANS_BOUNDS: yinyang (per group of centroids, N x G
    float64), elkan (one bound per point and centroid, N x k float32), delta (every point-centroid product kept
    and moved by the points that changed label, N x k float32: kmeans_delta.py) or auto, the default:
    Yinyang's bounds, handed over to delta once their filter stops paying (kmeans_delta.YinyangThenDelta; by
    way of Elkan's bounds while many labels change, unless the full passes are bfloat16-screened), when
    the N x k products fit ELKAN_MAX_BYTES and the run is not spherical (its renormalised centroids are not
    cluster means, so every delta pass would be dense); yinyang otherwise. elkan and delta raise when their
    state exceeds ELKAN_MAX_BYTES. portable: Yinyang's bounds by the kmeans_yinyang_pass op, the one form that
    also runs on CUDA (the only choice there: bounded_assignment_available); on the CPU it is slower than
    yinyang (no blocked scores, separation per group only) and checks the GPU's code."""
    requested = requested_bounds()
    if device != "cpu" or requested == "portable":
        return "portable"
    fits = n * k * 4 <= ELKAN_MAX_BYTES
    if requested in ("elkan", "delta") and not fits:
        raise ValueError(f"PYDC_KMEANS_BOUNDS={requested} needs {n} x {k} x 4 bytes of state, more than "
                         f"ELKAN_MAX_BYTES = {ELKAN_MAX_BYTES}; use yinyang")
    if requested == "auto":
        return "auto" if fits and not spherical else "yinyang"
    return requested


def bounded_assignment_available(x: torch.Tensor) -> bool:
    """True when the compiled kernels of bounded k-means can run on x: on the CPU; on CUDA only when
    PYDC_KMEANS_BOUNDS asks for yinyang or portable (kmeans_yinyang_pass's CUDA kernel is compiled and
    checked here through its CPU twin, but no GPU has run it yet, so CUDA runs plain Lloyd by default)."""
    from pydc.ops._registry import HAS_OPS

    if not HAS_OPS:
        return False
    if x.device.type == "cpu":
        return hasattr(torch.ops.pydc, "kmeans_assign_bounds")
    return (x.device.type == "cuda" and requested_bounds() in ("yinyang", "portable")
            and torch._C._dispatch_has_kernel_for_dispatch_key("pydc::kmeans_yinyang_pass", "CUDA"))


def group_layout(k: int) -> tuple[int, int]:
    """(groups, capacity) of the Yinyang grouping of k centroids: ceil(k / 16) groups of at most 16 (at most
    MAX_GROUPS groups; above 1024 centroids, the capacity is the next multiple of 16 that fits them all). The
    local filter scores a group in 16-centroid pairs of 8-centroid blocks (an odd last block alone), each a
    16-lane multiply-add at AVX-512: groups of exactly 16 leave no half-empty vector (balanced groups cut the
    filtered passes' time by ~20% on an Intel Xeon with AVX-512, 100k x 256, k = 1000, with the same fraction
    of scores)."""
    groups = max(1, min(MAX_GROUPS, -(-k // CENTROIDS_PER_GROUP)))
    per_group = -(-k // groups)
    return groups, -(-per_group // CENTROIDS_PER_GROUP) * CENTROIDS_PER_GROUP


def balanced_groups(centroids: torch.Tensor, centres: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each centroid's group: the nearest group centre with room, at most `capacity` centroids a group
    (needs len(centres) * capacity >= len(centroids)). Rounds of proposals: every unplaced centroid proposes
    to its nearest centre that still has room and each centre takes its nearest proposers up to its room
    (ties to the lower index); deterministic, a few rounds of k x groups work."""
    k, groups = centroids.shape[0], centres.shape[0]
    if groups * capacity < k:
        raise ValueError(f"balanced_groups: {groups} groups of {capacity} cannot hold {k} centroids")
    distance = torch.cdist(centroids.double(), centres.double())
    group = torch.full((k,), -1, dtype=torch.int64)
    room = torch.full((groups,), capacity, dtype=torch.int64)
    for _ in range(k + 1):  # every round places at least one centroid
        unplaced = (group < 0).nonzero().squeeze(1)
        if unplaced.numel() == 0:
            return group
        open_distance = distance[unplaced].masked_fill((room == 0).unsqueeze(0), float("inf"))
        nearest, choice = open_distance.min(dim=1)
        by_distance = torch.argsort(nearest, stable=True)
        by_group = by_distance[torch.argsort(choice[by_distance], stable=True)]  # grouped, nearest first
        chosen = choice[by_group]
        first = torch.searchsorted(chosen, chosen, right=False)
        taken = (torch.arange(chosen.numel()) - first) < room[chosen]
        group[unplaced[by_group[taken]]] = chosen[taken]
        room -= torch.bincount(chosen[taken], minlength=groups)
    raise RuntimeError("balanced_groups: centroids left unplaced")


class YinyangAssigner:
    """Assigns x to successive centroids of one Lloyd run, returning (labels, objective) as kmeans_assign
    would (identical labels) and computing GEMM rows only for points whose bounds do not settle them."""

    def __init__(self, x: torch.Tensor, point_sq_norms: torch.Tensor, k: int, group_seed: int,
                 portable: bool = False):
        self.portable = portable or x.device.type != "cpu"  # kmeans_yinyang_pass for every pass
        self.x = x
        self.point_sq_norms = point_sq_norms
        self.k = k
        self.group_seed = group_seed
        self.previous = None       # centroids of the last call (float32)
        self.labels = None
        self.lower = None          # (N, groups) float64
        self.order = None          # centroid positions sorted by group
        self.offsets = None
        self.group_of_sorted = None
        self.rows_computed = []    # per call: points with any score computed (benchmarks and tests) ...
        self.scores_computed = []  # ... and point-centroid scores computed (N * k without bounds)
        self.unfiltered_passes = 0  # passes to run without the filter (after filters that found most rows)
        self.points = None if self.portable else ScreenedPoints(x)  # full passes' GEMMs, bfloat16-screened
        self.backoff = 1

    def _make_groups(self, centroids: torch.Tensor) -> None:
        from pydc.cluster.kmeans import kmeans

        groups, capacity = group_layout(self.k)
        centroids = centroids.cpu()  # k x d: the grouping runs on the CPU, whatever the points' device
        if groups == 1:
            group = torch.zeros(self.k, dtype=torch.int64)
        else:  # Yinyang's grouping: a few Lloyd iterations over the initial centroids, filled to capacity
            centres = kmeans(centroids, groups, niter=5, seed=self.group_seed, backend="torch",
                             bounded=False).centroids
            group = balanced_groups(centroids, centres, capacity)
        order = torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=groups)
        device = self.x.device
        self.order = order.to(device)
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device)
        self.group_of_sorted = group[order].to(device)

    def _compute_all(self, centroids: torch.Tensor, sorted_centroids: torch.Tensor) -> tuple[torch.Tensor, float]:
        # Every score: exact labels and fresh group bounds from one GEMM pass + group-min fold (measured
        # faster than the local filter from zero bounds since the fold and the BLAS choice were sped up), the
        # GEMM in bfloat16 where that screen pays (the same labels; bounds looser by the screen's error).
        if self.portable:
            return self._portable_pass(centroids, sorted_centroids, None)
        x_bf16 = self.points.bf16_for(centroids, self.point_sq_norms)
        if x_bf16 is not None:
            labels, distances, _, self.lower = torch.ops.pydc.kmeans_assign_bounds_bf16(
                self.x, x_bf16, sorted_centroids, self.order, self.offsets, self.point_sq_norms)
        else:
            labels, distances, _, self.lower = torch.ops.pydc.kmeans_assign_bounds(
                self.x, sorted_centroids, self.order, self.offsets, self.point_sq_norms)
        self.labels = labels
        self._count(self.x.shape[0], self.x.shape[0] * self.k)
        self.previous = centroids.clone()
        return self.labels.clone(), float(distances.sum(dtype=torch.float64))

    def _portable_pass(self, centroids: torch.Tensor, sorted_centroids: torch.Tensor,
                       group_drift: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """One kmeans_yinyang_pass: a refresh (every score) without group_drift, else a filtered pass."""
        n, groups = self.x.shape[0], self.offsets.numel() - 1
        if self.labels is None:
            self.labels = torch.zeros(n, dtype=torch.int64, device=self.x.device)
            self.lower = torch.zeros(n, groups, dtype=torch.float64, device=self.x.device)
        refresh = group_drift is None
        if refresh:
            group_drift = torch.zeros(groups, dtype=torch.float64, device=self.x.device)
        distances, _, counts = torch.ops.pydc.kmeans_yinyang_pass(
            self.x, sorted_centroids, self.order, self.offsets, self.point_sq_norms, group_drift, refresh,
            self.labels, self.lower)
        rows, scores = counts.tolist()
        self._count(rows, scores)
        self.previous = centroids.clone()
        return self.labels.clone(), float(distances.sum())

    def _drifts(self, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each centroid's move since the last pass (float64 norm, rounded up) and each group's largest."""
        drift = (centroids.double() - self.previous.double()).norm(dim=1) * _ROUND_UP
        groups = self.offsets.numel() - 1
        group_drift = torch.zeros(groups, dtype=torch.float64, device=drift.device).scatter_reduce_(
            0, self.group_of_sorted, drift[self.order], reduce="amax", include_self=True)
        return drift, group_drift

    def predicted_fraction(self, centroids: torch.Tensor, stride: int = 16) -> float | None:
        """The fraction of all point-centroid scores that the next pass's filter would leave to compute,
        estimated on every stride-th point before running it (None when the next pass does not filter): the
        groups whose drift-decayed lower bound does not exceed the distance to the own centroid, and the own
        group, each of its size. Points that the separation filter might settle (own centroid's norm + the
        largest norm > twice that distance: data with cluster structure) count as settled. A guide for
        choosing the next pass (~2% of a pass at 100k x 256, k = 1000), not a bound: the kernel's margins are
        not applied."""
        if self.previous is None or self.unfiltered_passes > 0 or self.order is None:
            return None
        _, group_drift = self._drifts(centroids)
        labels = self.labels[::stride]
        own = centroids.index_select(0, labels)
        upper = (self.x[::stride] - own).norm(dim=1).double()
        needed = self.lower[::stride] <= upper.unsqueeze(1) + group_drift
        position = torch.empty_like(self.order)
        position[self.order] = torch.arange(self.k)
        needed.scatter_(1, self.group_of_sorted[position[labels]].unsqueeze(1), True)
        group_sizes = (self.offsets[1:] - self.offsets[:-1]).double()
        scores = needed.double() @ group_sizes
        separable = own.norm(dim=1).double() + centroids.norm(dim=1).max().item() > 2 * upper
        return float(scores.masked_fill_(separable, 0.0).sum()) / (labels.numel() * self.k)

    def __call__(self, centroids: torch.Tensor) -> tuple[torch.Tensor, float]:
        if self.order is None:
            self._make_groups(centroids)
        sorted_centroids = centroids.index_select(0, self.order)
        if self.previous is None:
            return self._compute_all(centroids, sorted_centroids)
        if self.unfiltered_passes > 0:
            # The last filters scored most centroids anyway: skip the filters' own cost (a float64 distance
            # per point, passes over the N x G bounds) for a while. Plain kmeans_assign gives the same
            # labels; the last of these passes refreshes the bounds for the next filter.
            self.unfiltered_passes -= 1
            if self.unfiltered_passes == 0 or self.portable:  # portable: each full pass is exact and refreshes
                return self._compute_all(centroids, sorted_centroids)
            self._count(self.x.shape[0], self.x.shape[0] * self.k)
            labels, distances = self.points.assign(centroids, self.point_sq_norms)
            self.labels = labels
            return labels.clone(), float(distances.sum(dtype=torch.float64))
        _, group_drift = self._drifts(centroids)
        if self.portable:
            labels, objective = self._portable_pass(centroids, sorted_centroids, group_drift)
            self._back_off(self.scores_computed[-1])
            return labels, objective
        distances, counts = torch.ops.pydc.kmeans_assign_yinyang(
            self.x, sorted_centroids, self.order, self.offsets, self.point_sq_norms, group_drift, self.labels,
            self.lower)
        rows, scores = counts.tolist()
        self._count(rows, scores)
        self._back_off(scores)
        self.previous = centroids.clone()
        return self.labels.clone(), float(distances.sum())

    def _back_off(self, scores: int) -> None:
        """After a filter that scored more than DENSE_FRACTION of all pairs, the next 1, 2, 4, 8 passes (after
        successive such filters) score everything without filtering."""
        if scores > DENSE_FRACTION * self.x.shape[0] * self.k:
            self.unfiltered_passes = self.backoff
            self.backoff = min(2 * self.backoff, MAX_BACKOFF)
        else:
            self.backoff = 1

    def _count(self, rows: int, scores: int) -> None:
        self.rows_computed.append(rows)
        self.scores_computed.append(scores)
