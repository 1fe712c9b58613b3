"""Bounded k-means with one lower bound per (point, centroid) (Elkan, ICML 2003) for pydc's CPU k-means:
Lloyd's labels, scoring only the pairs whose bound does not prove them farther than the own centroid.

Yinyang's bounds (kmeans_bounded.py) are per group of ~16 centroids: on data without cluster structure
(points on the unit sphere, 100k x 256, k = 1000) a group bound is the minimum over 16 similar distances,
and its filter keeps ~54% of all pairs over 20 iterations even with exact distances to the own centroid.
One bound per pair keeps ~26% (a simulation of both filters on that data) and 6% on clustered data where
Yinyang keeps 28%: this assigner is used whenever the N x k float32 bounds fit the memory budget
(kmeans_bounded.choose_bounds).

The bounds are stored as anchors (kmeans_math.h): anchor[i, j] - D_j <= d(x_i, c_j), D_j being centroid j's
cumulative drift (float64, every move's norm rounded up and summed rounding up), so a move costs one
addition per centroid instead of a pass over the N x k bounds. A pass (torch.ops.pydc.kmeans_assign_elkan,
csrc/ops/cpu/kmeans_elkan_kernel.cpp) skips a point when its Hamerly bound (the smallest of its other
bounds, decayed by the largest move) exceeds its own distance by the exactness margin, otherwise scores its
row's candidates: the centroids whose bound, or separation from the own centroid, does not prove them
farther. Every skipped centroid is farther than the own one by the margin that makes the float32 ranking
exact, so the labels are kmeans_assign's (kmeans_cpu.h) and the centroids plain Lloyd's, bitwise. The first
pass, and any pass whose sampled fraction of candidate pairs exceeds DENSE_FRACTION, scores every pair with
the BLAS GEMM of kmeans_assign instead and sets every bound from those scores.

PYDC_KMEANS_BOUNDS=auto runs it in the middle of unstructured runs whose full passes are not bfloat16-screened
(kmeans_delta.YinyangThenDelta): after Yinyang's first pass, while too many labels change for the moved
products. Its sparse passes take the points in index order, in batches of 64 that score each centroid they
need at once, with dot products of four independent chains per row (cpu_kernels' centroid_dots; one chain made
each dot wait on the multiply-add latency, ~4x the GEMM's cost per pair; now ~2.5x), so a pass right after a
dense one that scores 15% of the pairs takes ~0.16 s against a plain pass's 0.25 s capped at AVX2 (AMD EPYC
Zen 4, 2 threads; index order, not label order: kmeans_elkan_kernel.cpp).

CUDA design (not built): the anchors in device memory (N x k float32, the same budget), one warp per point:
the own distance in float64, the Hamerly test, a ballot-compacted scan of the row into shared memory, the
candidates' dot products by the warp (the point's row in registers), top-2 and a float64 settle of
near-ties; dense passes reuse the cuBLAS path of kmeans_kernel.cu with an anchor-writing epilogue.
"""

from __future__ import annotations

import torch

from pydc.cluster.kmeans_bounded import pair_state_floats
from pydc.utils.memory import kept_empty

# A pass whose sample has more candidate pairs than this scores every pair by GEMM. A sparse pass costs ~0.12 s +
# 1.6 s x its fraction of pairs at 100k x 256, k = 1000 (AVX-512, 2 threads) against 0.38 s for a dense one, which
# also leaves every bound tight: 0.15 took unstructured k-means from 8.7-9.3 s (at 0.35) to 6.6-7.0 s there and
# from 10.4 to 9.1-10.1 s capped at AVX2 (where Yinyang is as fast), clustered unchanged (2.1 and 2.9-3.5 s);
# 0.05 made clustered passes dense (3.1 s).
DENSE_FRACTION = 0.15
_ROUND_UP = 1.0 + 1e-12  # float64 norms of float32 differences: relative error far below 1e-12


class ElkanAssigner:
    """Assigns x to successive centroids of one Lloyd run, returning (labels, objective) as kmeans_assign
    would (identical labels), scoring only the point-centroid pairs its bounds do not settle."""

    def __init__(self, x: torch.Tensor, point_sq_norms: torch.Tensor, k: int, plain_passes: int = 0):
        """plain_passes: calls to answer with plain kmeans_assign, setting no bound, before the first dense
        pass (a run handed over right after its first pass, whose centroids move too far for bounds)."""
        n = x.shape[0]
        self.plain_passes = plain_passes
        self.x = x
        self.point_sq_norms = point_sq_norms
        self.labels = torch.zeros(n, dtype=torch.int64)
        self.memory = kept_empty(pair_state_floats(n, k, x.shape[1]), dtype=torch.float32)  # release() hands it on
        self.anchors = self.memory[:n * k].view(n, k)
        self.second = torch.zeros(n, dtype=torch.float64)
        self.offsets = torch.zeros(k, dtype=torch.float64)  # cumulative drift of every centroid, rounded up
        self.previous = None
        self.rows_computed = []    # per call: points with any score computed (benchmarks and tests) ...
        self.scores_computed = []  # ... and point-centroid scores computed (N * k for a dense pass)
        self.passes = []  # per call: "plain" (kmeans_assign, no bound set), "dense" (GEMM) or "sparse"

    def release(self) -> torch.Tensor:
        """Gives up the N x k float32 bounds (a run handing over to another assigner) and returns their memory
        (flat float32, pair_state_floats long), to be reused or freed; the counts stay, no pass can follow."""
        memory, self.memory, self.anchors, self.second = self.memory, None, None, None
        return memory

    def __call__(self, centroids: torch.Tensor) -> tuple[torch.Tensor, float]:
        if self.anchors is None:
            raise RuntimeError("ElkanAssigner: called after release()")
        if self.plain_passes > 0:
            self.plain_passes -= 1
            labels, distances = torch.ops.pydc.kmeans_assign(self.x, centroids, self.point_sq_norms, True)
            self.labels.copy_(labels)
            self._count(self.x.shape[0], self.x.shape[0] * centroids.shape[0], "plain")
            return labels, float(distances.sum(dtype=torch.float64))
        if self.previous is None:
            max_drift, dense_fraction = 0.0, 0.0  # the first pass sets every bound
        else:
            drift = (centroids.double() - self.previous.double()).norm(dim=1) * _ROUND_UP
            drift = drift.nan_to_num(nan=float("inf"))  # a NaN centroid (a cluster with a NaN row): no bound
            # rounded-up sums, so that D_j(now) - D_j(then) >= every move in between
            self.offsets = torch.nextafter(self.offsets + drift, torch.tensor(float("inf"), dtype=torch.float64))
            max_drift, dense_fraction = float(drift.max()), DENSE_FRACTION
        distances, counts = torch.ops.pydc.kmeans_assign_elkan(
            self.x, centroids, self.point_sq_norms, self.offsets, max_drift, dense_fraction, self.labels,
            self.anchors, self.second)
        rows, scores, dense = counts.tolist()
        self._count(rows, scores, "dense" if dense else "sparse")
        self.previous = centroids.clone()
        return self.labels.clone(), float(distances.sum())

    def _count(self, rows: int, scores: int, kind: str) -> None:
        self.rows_computed.append(rows)
        self.scores_computed.append(scores)
        self.passes.append(kind)
