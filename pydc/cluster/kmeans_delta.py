"""Lloyd's labels from updated dot products, for pydc's CPU k-means on data without cluster structure.

Bounds (Yinyang, Elkan) skip a point-centroid score when the triangle inequality proves it cannot win; on
unstructured data they prove little: on the unit sphere in 256 dimensions (100k points, k = 1000) the
distances from a point to its 1000 centroids span ~0.5, its best two lie ~0.01 apart, and the centroids move
0.02-0.07 per iteration, so every bound is spent within an iteration or two. What does shrink is the number of
points that change label: 16.7k, 7.9k, 4.7k, 3.0k, 2.0k, 1.4k, 1.0k, 0.8k, 0.6k, 0.46k ... 0.05k over 20
iterations of that run. A Lloyd update moves only the centroids those points left or joined, and exactly by
them: c'_j = (n_j c_j + sum of the points that joined - sum of those that left) / n'_j, up to rounding. So
this assigner keeps every product x_i . c_j (k N float32, the same memory as Elkan's bounds; in blocks of
LAYOUT_ROWS points, each block's k runs of products centroid after centroid: products_by_centroid) and, once
at most DENSE_CHANGES * k points changed label, moves them to the new centroids with one GEMM of the points by
the m changed points (N x m x d multiply-adds instead of N x k x d) and, per block of points, one pass over
the moved centroids' runs of products that scales them, adds the joined points' products, takes off the left
points' and folds them into each point's top list (its TOP_SLOTS best scores and a floor under the others, set
by the dense passes), so the runs of the centroids nothing moved are not read: 10-35% of them are moved late
in the run above (torch.ops.pydc.kmeans_assign_delta, csrc/ops/cpu/kmeans_delta_kernel.cpp; the passes of the
last third took 25 instead of 33 ms each capped at AVX2, AMD EPYC Zen 4, 2 threads). A rigorous per-centroid
bound on the products' accumulated error widens kmeans_assign's near-tie margin; rows inside it are settled in
float64, so the labels are kmeans_assign's exactly (and the centroids plain Lloyd's, bitwise). Passes with
more changes, the first one, and any pass whose error bound has grown too far (an empty-cluster split, a
spherical renormalisation: centroids that are not the means of the last labels) score every pair by GEMM,
which resets the products. Early passes change too many
labels for this (16.7k down to 0.8k in the first nine passes of the run above), so those stay dense, and
those whose successor is not expected to move products either (KEEP_CHANGES) run plain kmeans_assign, which
does not write the N x k products out, or its bfloat16-screened form where that is faster (kmeans_assign_bf16,
pydc/ops/bf16_screen.py; the same labels). Without the screen, auto's runs give those passes to Elkan's bounds
instead (YinyangThenDelta).

CUDA design (not built): the k x N products in device memory (float32, the same budget, centroid-major over
all N points, so that consecutive threads read consecutive points: the blocks of the CPU layout serve its
caches and DRAM streams, which coalesced warps do not need); a dense pass is one cuBLAS SGEMM of the centroids
by x^T into them; a delta pass one SGEMM of the gathered changed points by x^T (m x N), then one kernel with a
thread per point that walks the centroids: a moved centroid's product scaled by n_j / n'_j plus its joined and
left points' products (the per-centroid lists of update_fold_columns_top2 in shared memory), stored back, and
every product folded into the thread's top-2; the rows inside the margin are settled in float64 by a second
kernel (a warp per row), the residuals and error bounds (k x d, float64) by a third.
"""

from __future__ import annotations

import torch

from pydc.cluster.kmeans_bounded import DENSE_FRACTION, packed_points_floats, pair_state_floats
from pydc.cluster.kmeans_elkan import ElkanAssigner
from pydc.ops.bf16_screen import ScreenedPoints
from pydc.utils.memory import kept_empty

# Points per block of kmeans_assign_delta's products (kLayoutRows in csrc/ops/cpu/kmeans_delta_kernel.cpp).
LAYOUT_ROWS = 1024

# A pass with more than DENSE_CHANGES * k changed labels scores every pair by GEMM instead. At 100k x 256,
# k = 1000 (Intel Xeon, AVX-512, 2 threads) a dense pass took ~0.36 s and a delta pass ~0.065 s + 0.36 ms per
# changed point (its GEMM column and two scaled runs per block), so 791 changes cost as much as a dense pass.
DENSE_CHANGES = 0.6
# A dense pass keeps its products for the next pass only when that one may move them: when the last pass
# changed at most KEEP_CHANGES * DENSE_CHANGES * k labels (the count shrank by 0.47-0.8 per pass in the run
# above, 0.7-0.8 from 1.4k changes on). Otherwise it is plain kmeans_assign, without streaming out the N x k
# products (0.32 s against 0.34-0.48 s for a dense pass there; 0.21 s bfloat16-screened). A wrong guess costs
# time only: products kept unused (a dense pass instead of a plain one, ~0.15-0.27 s), or a dense pass where
# products could have moved (~0.1 s at 0.6 k changes); hence the low factor.
KEEP_CHANGES = 1.5
# YinyangThenDelta's Elkan passes hand over to delta after a pass that changed at most this many labels per
# centroid: delta's first pass then keeps its products. Later (0.6, 0.4, 0.25) was slower capped at AVX2 on
# the run above: Elkan's passes there score 10-14% of the pairs at ~2.5x the GEMM's cost per pair.
ELKAN_UNTIL_CHANGES = KEEP_CHANGES * DENSE_CHANGES


# Each point's top list of kmeans_assign_delta (kDeltaTopRows in csrc/ops/cpu/cpu_kernels.h): its TOP_SLOTS
# best scores under the kept products, their centroids, and a floor under every other score.
TOP_SLOTS = 4


def empty_tops(n: int) -> torch.Tensor:
    """The (2 TOP_SLOTS + 1, n) float32 top lists of kmeans_assign_delta for n points, none valid yet (floor
    NaN): a dense pass sets them, a moved pass folds any that are not valid from the products."""
    return torch.full((2 * TOP_SLOTS + 1, n), float("nan"), dtype=torch.float32)


def products_by_centroid(dots: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The k x N matrix of kmeans_assign_delta's products (dots, k N float32 in blocks of LAYOUT_ROWS points,
    each block's runs centroid after centroid): [j, i] is point i's product with centroid j. A copy."""
    if dots.numel() != k * n:
        raise ValueError(f"products_by_centroid: expected {k * n} products, got {dots.numel()}")
    flat = dots.reshape(-1)
    full = n // LAYOUT_ROWS * LAYOUT_ROWS
    blocks = flat[:full * k].view(-1, k, LAYOUT_ROWS).permute(1, 0, 2).reshape(k, full)
    return torch.cat([blocks, flat[full * k:].view(k, n - full)], dim=1)


class DeltaAssigner:
    """Assigns x to successive centroids of one Lloyd run, returning (labels, objective) as kmeans_assign
    would (identical labels), by updating every point-centroid product with the points that changed label."""

    def __init__(self, x: torch.Tensor, point_sq_norms: torch.Tensor, k: int,
                 labels: torch.Tensor | None = None, changed: int | None = None,
                 points: ScreenedPoints | None = None, memory: torch.Tensor | None = None):
        """labels: the labels whose cluster means the first call's centroids are, when they are (a run handed
        over from other bounds), so that the second call can already move the products; changed: how many of
        them their pass changed, when known (None: the first call keeps its products); points: the run's
        ScreenedPoints of x, when the assigner handing over has them; memory: contiguous float32 of at least
        N x k elements to hold the products and, from pair_state_floats(N, k, d) on, the points packed for
        pydc's GEMM (the bounds of an assigner handing over: their pages are already mapped, saving ~0.1 s of
        page faults for 400 MB), any contents."""
        n, d = x.shape
        self.x = x
        self.point_sq_norms = point_sq_norms
        self.k = k
        self.labels = torch.zeros(n, dtype=torch.int64) if labels is None else labels.clone()
        self.changed = n if labels is None else changed  # labels the last pass changed (None: not known)
        self.memory = None  # flat float32: the products, then the packed points where there is room
        self.dots = None  # (k N,) float32 in layout blocks (products_by_centroid), from the first keeping pass
        self.packed_x = None  # kmeans_assign_delta's packed_x, where the memory holds it
        if memory is not None:
            if memory.dtype != torch.float32 or memory.numel() < k * n or not memory.is_contiguous():
                raise ValueError(f"DeltaAssigner: memory must be {n} x {k} contiguous float32 or more, got "
                                 f"{memory.dtype} of shape {tuple(memory.shape)}")
            self._take(memory.view(-1))
        self.column_error = torch.zeros(k, dtype=torch.float64)
        self.basis_labels = torch.zeros(n, dtype=torch.int64)
        self.basis_centroids = torch.zeros((k, d), dtype=torch.float32)
        self.tops = empty_tops(n)  # each point's best scores under the products (set by every dense pass)
        self.started = False  # whether dots hold the products of the last pass
        self.points = ScreenedPoints(x) if points is None else points  # plain passes, screened where it pays
        self.rows_computed = []    # per call: rows settled in float64 (N for a dense pass) ...
        self.scores_computed = []  # ... and point products computed: N x m, or N x k for a dense pass
        # per call: "plain" (kmeans_assign), "screened" (kmeans_assign_bf16), "dense" (products kept), "moved"
        self.passes = []

    def __call__(self, centroids: torch.Tensor) -> tuple[torch.Tensor, float]:
        n, k = self.x.shape[0], self.k
        dense = not self.started or self.changed > DENSE_CHANGES * k
        keep = self.changed is None or self.changed <= KEEP_CHANGES * DENSE_CHANGES * k
        if dense and not keep:
            labels, distances = self.points.assign(centroids, self.point_sq_norms)
            self.changed = int((labels != self.labels).sum())
            self.labels, self.started = labels, False
            self._count(n, n * k, "screened" if self.points.screens() else "plain")
            return labels.clone(), float(distances.sum(dtype=torch.float64))
        if self.memory is None:
            self._take(kept_empty(pair_state_floats(n, k, self.x.shape[1]), dtype=torch.float32))
        distances, counts = torch.ops.pydc.kmeans_assign_delta(
            self.x, centroids, self.point_sq_norms, DENSE_CHANGES if self.started else -1.0, self.labels,
            self.dots, self.column_error, self.basis_labels, self.basis_centroids, self.tops, self.packed_x)
        self.started = True
        self.changed = int((self.labels != self.basis_labels).sum())
        settled, scores, dense = counts.tolist()
        self._count(n if dense else settled, scores, "dense" if dense else "moved")
        return self.labels.clone(), float(distances.sum())

    def _count(self, rows: int, scores: int, kind: str) -> None:
        self.rows_computed.append(rows)
        self.scores_computed.append(scores)
        self.passes.append(kind)

    def _take(self, memory: torch.Tensor) -> None:
        n, d = self.x.shape
        self.memory, self.dots, self.packed_x = memory, memory[:self.k * n], None
        if memory.numel() >= self.k * n + packed_points_floats(n, d):
            self.packed_x = memory[self.k * n:self.k * n + packed_points_floats(n, d)]

    def release(self) -> torch.Tensor | None:
        """Gives up the kept products (the run has ended) and returns their memory (flat; None before any was
        allocated); a later call starts again from a dense pass."""
        memory, self.memory, self.dots, self.packed_x, self.started = self.memory, None, None, None, False
        return memory


class YinyangThenDelta:
    """backend="torch"'s default assigner (PYDC_KMEANS_BOUNDS=auto): Yinyang's bounds while their filter skips
    most scores (data with cluster structure, where they settle most points from the second pass on), then
    DeltaAssigner for the rest of the run, handed the labels whose means the centroids are, once the filter
    stops paying (unstructured data): before a filtered pass that YinyangAssigner.predicted_fraction expects
    to score more than the Yinyang DENSE_FRACTION of all pairs (on the unstructured data above it expects
    1.00 before the second pass, which scores 1.00 and costs ~1.9x a dense pass), or after a filtered pass
    that did.

    Between the two, while too many labels change for the products to move (more than ELKAN_UNTIL_CHANGES *
    k) and the run's full passes are not bfloat16-screened, Elkan's per-pair bounds
    (kmeans_elkan.ElkanAssigner) take the passes: right after a pass that scored every pair they prove all
    but 15%, 5%, 2%, 1% of the pairs farther than the own centroid on the unstructured data above (passes 3 to
    6), where a plain pass scores them all; capped at AVX2 its passes 1-8 took 2.8-3.4 s against 3.8-4.2 s
    plain (Intel Xeon f6m167, 2 threads). With the screen (AVX-512 with bfloat16 hardware) a plain pass costs about
    what Elkan's dense passes save, so the run goes to delta directly. Every assigner gives kmeans_assign's
    labels, so no hand-over changes a label."""

    def __init__(self, yinyang, x: torch.Tensor, point_sq_norms: torch.Tensor, k: int):
        self.yinyang = yinyang
        self.x, self.point_sq_norms, self.k = x, point_sq_norms, k
        self.elkan = None   # the middle assigner, once used (released when it hands over to delta)
        self.labels = None  # the labels of the last pass (the changes of Elkan's passes)
        self.delta = None

    def __call__(self, centroids: torch.Tensor) -> tuple[torch.Tensor, float]:
        if self.delta is not None:
            return self.delta(centroids)
        if self.elkan is not None:
            return self._elkan_pass(centroids)
        predicted = self.yinyang.predicted_fraction(centroids)
        if predicted is not None and predicted > DENSE_FRACTION:
            first = len(self.yinyang.scores_computed) == 1  # the labels of the first pass are all new
            self._hand_over(self.yinyang.labels, self.x.shape[0] if first else None)
            return self(centroids)
        labels, objective = self.yinyang(centroids)
        if self.yinyang.unfiltered_passes > 0:  # the filter scored most pairs: Yinyang backs off from here
            self._hand_over(labels, None)
        return labels, objective

    def _hand_over(self, labels: torch.Tensor, changed: int | None) -> None:
        many = changed is None or changed > ELKAN_UNTIL_CHANGES * self.k
        if many and not self.yinyang.points.screens():
            # right after the first pass every centroid moves by about its spread (0.8 on the unit sphere in
            # the run above, 0.06 the pass after): bounds set in the next pass could prove nothing after it
            plain = int(changed == self.x.shape[0])
            self.elkan = ElkanAssigner(self.x, self.point_sq_norms, self.k, plain_passes=plain)
            self.labels = labels
        else:
            self._to_delta(labels, changed)

    def _to_delta(self, labels: torch.Tensor, changed: int | None, memory: torch.Tensor | None = None) -> None:
        self.delta = DeltaAssigner(self.x, self.point_sq_norms, self.k, labels=labels, changed=changed,
                                   points=self.yinyang.points, memory=memory)

    def _elkan_pass(self, centroids: torch.Tensor) -> tuple[torch.Tensor, float]:
        labels, objective = self.elkan(centroids)
        changed = int((labels != self.labels).sum())
        self.labels = labels
        if changed <= ELKAN_UNTIL_CHANGES * self.k:  # the products can move from the next pass on
            self._to_delta(labels, changed, memory=self.elkan.release())  # its bounds' memory takes the products
        return labels, objective

    def release(self) -> torch.Tensor | None:
        """The N x k memory of the assigner in use (Elkan's bounds or delta's products), given up; None without."""
        if self.delta is not None:
            return self.delta.release()
        return self.elkan.release() if self.elkan is not None else None

    @property
    def used(self) -> str:
        """The assigners the run has used: "yinyang", "yinyang+delta", "yinyang+elkan" or "yinyang+elkan+delta"."""
        return "yinyang" + ("+elkan" if self.elkan is not None else "") + ("+delta" if self.delta is not None else "")

    def _counts(self, name: str) -> list[int]:
        return [count for assigner in (self.yinyang, self.elkan, self.delta) if assigner is not None
                for count in getattr(assigner, name)]

    @property
    def rows_computed(self) -> list[int]:
        return self._counts("rows_computed")

    @property
    def scores_computed(self) -> list[int]:
        return self._counts("scores_computed")
