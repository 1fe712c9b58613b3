"""Bounded k-means (Yinyang's group bounds, Elkan's per-pair bounds, the moved products of kmeans_delta, and
auto's hand-over from the first to the last: PYDC_KMEANS_BOUNDS) equals plain Lloyd, and the fixed-point stop
equals running every iteration.

Bounded and plain runs start from the same centroids; the labels, centroids and splits must be identical
and the objective equal up to float rounding (1e-6 relative), on clustered, unstructured, duplicate-point and
empty-cluster data, at every ISA level this CPU supports. Each case also checks that the bounds did skip
work, so that a bounded run silently falling back to plain Lloyd would not pass.
"""

from __future__ import annotations

import pytest
import torch

from pydc.cluster import kmeans
from pydc.cluster.kmeans import initial_centroids
from pydc.ops.cpu_capability import LEVELS, cpu_capability_level, supported_levels


def clustered(n=4000, d=24, centres=40, seed=0):
    """Gaussian centres (scale 3) plus unit noise, as the benchmark's clustered data."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, d, generator=generator) * 3
    return means[torch.randint(0, centres, (n,), generator=generator)] + torch.randn(n, d, generator=generator)


def unstructured(n=4000, d=24, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)


def duplicates(seed=2):
    base = clustered(n=700, d=16, centres=12, seed=seed)
    x = torch.cat([base, base, base[:300], base[:5].repeat(40, 1)])  # exact duplicates: exact ties of scores
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))]


def empty_cluster_start(x, k, seed=3):
    """A start where a quarter of the centroids are far from every point: they empty and are split."""
    init = initial_centroids(x, k, seed)
    init[::4] = 1e3 + torch.arange(len(init[::4]), dtype=torch.float32).unsqueeze(1)
    return init


# the assigners an auto run may use, in order (kmeans_delta.YinyangThenDelta.used)
AUTO_CHAINS = ("yinyang", "yinyang+delta", "yinyang+elkan", "yinyang+elkan+delta")

CASES = {
    "clustered": lambda: (clustered(), 48, None),
    "unstructured": lambda: (unstructured(), 40, None),
    "duplicates": lambda: (duplicates(), 30, None),
    "empty_clusters": lambda: (clustered(seed=4), 44, "empty"),
}


@pytest.fixture(params=["yinyang", "elkan", "delta", "auto", "portable"])
def bounds(request, monkeypatch):
    """Runs a test with each kind of bounds (delta, and auto once handed over, moving the products whatever the
    number of changed labels, so that these small runs take that path; portable: kmeans_yinyang_pass, the
    CUDA form's code run on the CPU)."""
    from pydc.cluster import kmeans_delta

    monkeypatch.setenv("PYDC_KMEANS_BOUNDS", request.param)
    if request.param in ("delta", "auto"):
        monkeypatch.setattr(kmeans_delta, "DENSE_CHANGES", 1e9)
    return request.param


def assert_same_run(bounded, plain):
    assert bounded.bounded and not plain.bounded
    assert torch.equal(bounded.labels, plain.labels)
    assert torch.equal(bounded.centroids, plain.centroids)
    assert bounded.splits == plain.splits and bounded.iterations == plain.iterations
    assert bounded.objective == pytest.approx(plain.objective, rel=1e-6)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bounded_equals_plain_lloyd(case, level, bounds):
    if level not in supported_levels():
        pytest.skip(f"CPU lacks {level}")
    x, k, start = CASES[case]()
    init = empty_cluster_start(x, k) if start == "empty" else initial_centroids(x, k, seed=7)
    with cpu_capability_level(level):
        for stop in (True, False):
            plain = kmeans(x, k, niter=12, seed=5, backend="torch", init_centroids=init, bounded=False,
                           stop_at_fixed_point=stop)
            bounded = kmeans(x, k, niter=12, seed=5, backend="torch", init_centroids=init, bounded=True,
                             stop_at_fixed_point=stop)
            assert_same_run(bounded, plain)
            assert bounded.bounds == bounds or (bounds == "auto" and bounded.bounds in AUTO_CHAINS)
            assert len(bounded.rows_computed) == bounded.iterations + (0 if bounded.iterations < 12 else 1)
            # the bounds skipped work (the first pass computes every row)
            assert sum(bounded.rows_computed[1:]) < x.shape[0] * (len(bounded.rows_computed) - 1)
    if start == "empty":
        assert plain.splits >= k // 4


def test_bounded_stays_exact_on_near_ties(bounds):
    """Points exactly between two centroids, and a centroid equal to another: ties go to the lowest index."""
    generator = torch.Generator().manual_seed(8)
    centroids = torch.randn(20, 8, generator=generator).round()  # small integers: midpoints are exact
    centroids[5] = centroids[17]
    midpoints = (centroids[torch.arange(0, 20, 2)] + centroids[torch.arange(1, 20, 2)]) / 2
    x = torch.cat([midpoints.repeat(30, 1), centroids.repeat(10, 1), torch.randn(500, 8, generator=generator)])
    plain = kmeans(x, 20, niter=6, backend="torch", init_centroids=centroids, bounded=False)
    bounded = kmeans(x, 20, niter=6, backend="torch", init_centroids=centroids, bounded=True)
    assert_same_run(bounded, plain)
    labels, _ = torch.ops.pydc.kmeans_assign(x, centroids, None, True)
    exact = torch.cdist(x.double(), centroids.double()).pow(2)
    first_min = (exact == exact.min(1, keepdim=True).values).int().argmax(1)  # lowest index among exact minima
    assert torch.equal(labels, first_min)


def test_bounded_equals_plain_lloyd_on_data_with_nan_rows(bounds):
    """NaN rows (label 0, as kmeans_assign gives) make their cluster's centroid NaN: every bounded path must
    still give plain Lloyd's labels and centroids, not stop on the screening ops' domain or a NaN drift."""
    x = clustered(n=3000, d=16, centres=30, seed=3)
    x[[5, 700]] = float("nan")
    init = initial_centroids(x[10:690], 30, seed=7)
    plain = kmeans(x, 30, niter=8, backend="torch", init_centroids=init, bounded=False)
    bounded = kmeans(x, 30, niter=8, backend="torch", init_centroids=init, bounded=True)
    assert bounded.bounded and plain.labels[5] == 0 and plain.centroids[0].isnan().all()
    assert torch.equal(bounded.labels, plain.labels)
    assert torch.equal(bounded.centroids.nan_to_num(), plain.centroids.nan_to_num())


def test_assign_bounds_gives_nan_rows_label_zero():
    """kmeans_assign_bounds labels a row without a finite score 0 (kmeans_assign's label), not the original
    index of the first sorted centroid."""
    x = clustered(n=64, d=8, centres=30, seed=6)
    x[3] = float("nan")
    centroids = initial_centroids(x[4:], 30, seed=1)
    order = torch.arange(30).roll(7)  # the first sorted centroid is centroid 23
    offsets = torch.tensor([0, 16, 30])
    labels, *_ = torch.ops.pydc.kmeans_assign_bounds(x, centroids[order], order, offsets, (x * x).sum(1))
    assert torch.equal(labels, torch.ops.pydc.kmeans_assign(x, centroids, None, True)[0])
    assert labels[3] == 0


def test_screen_domain_excludes_non_finite_and_huge_inputs():
    from pydc.ops.bf16_screen import ScreenedPoints

    x = clustered(n=200, d=8, centres=5, seed=1)
    norms = (x * x).sum(1)
    centroids = x[:5].clone()
    assert ScreenedPoints(x).in_domain(centroids, norms)
    assert not ScreenedPoints(x).in_domain(centroids * 1e16, norms)  # ||c||^2 near float32's overflow
    nan_centroids = centroids.clone()
    nan_centroids[2, 1] = float("nan")
    assert not ScreenedPoints(x).in_domain(nan_centroids, norms)
    bad = x.clone()
    bad[9, 0] = float("inf")
    assert not ScreenedPoints(bad).in_domain(centroids, (bad * bad).sum(1))
    screened = ScreenedPoints(x)
    screened._screen = True  # as a run that screens (no bfloat16 GEMM runs here)
    assert screened.bf16_for(centroids, norms) is not None and screened.bf16_for(nan_centroids, norms) is None


def assert_group_bounds_hold(x, centroids, order, offsets, labels, upper, lower) -> torch.Tensor:
    """upper >= the exact distance to the labelled centroid, and each group's lower bound <= the exact distance to
    every member of the group but the labelled one (+inf for an empty group); returns the exact distances."""
    exact = torch.cdist(x.double(), centroids.double())
    assert bool((upper >= exact.gather(1, labels.unsqueeze(1)).squeeze(1)).all())
    for g in range(offsets.numel() - 1):
        members = order[offsets[g]:offsets[g + 1]]
        if members.numel() == 0:
            assert bool(torch.isinf(lower[:, g]).all())
            continue
        others = exact[:, members].masked_fill(members.unsqueeze(0) == labels.unsqueeze(1), float("inf"))
        assert bool((lower[:, g] <= others.min(1).values).all())
    return exact


def test_assign_bounds_kernel_bounds_hold():
    """The kernel's labels are kmeans_assign's (original indices through centroid_ids), upper >= the exact
    distance to the chosen centroid, and every group lower bound <= the exact distance to the other members."""
    x = clustered(n=1500, d=20, centres=30, seed=9)
    centroids = initial_centroids(x, 30, seed=1)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(3))
    offsets = torch.tensor([0, 4, 4, 13, 30])  # an empty group too
    norms = (x * x).sum(1)
    labels, distances, upper, lower = torch.ops.pydc.kmeans_assign_bounds(x, centroids[order], order, offsets, norms)
    plain_labels, plain_distances = torch.ops.pydc.kmeans_assign(x, centroids, norms, True)
    assert torch.equal(labels, plain_labels)
    torch.testing.assert_close(distances, plain_distances, rtol=1e-5, atol=1e-3)
    exact = assert_group_bounds_hold(x, centroids, order, offsets, labels, upper, lower)
    own = torch.ops.pydc.kmeans_label_distances(x, centroids, labels)
    torch.testing.assert_close(own, exact.gather(1, labels.unsqueeze(1)).squeeze(1).pow(2), rtol=1e-12, atol=1e-9)


def separable(n_per=300, d=6, blobs=8, seed=11):
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(blobs, d, generator=generator) * 50
    return (means.repeat_interleave(n_per, 0) + torch.randn(blobs * n_per, d, generator=generator)), means


@pytest.mark.parametrize("bounded", [False, True])
def test_fixed_point_stop_equals_running_every_iteration(bounded, bounds):
    x, means = separable()
    init = initial_centroids(x, 8, seed=0)
    stopped = kmeans(x, 8, niter=30, backend="torch", init_centroids=init, bounded=bounded)
    full = kmeans(x, 8, niter=30, backend="torch", init_centroids=init, bounded=bounded, stop_at_fixed_point=False)
    assert stopped.iterations < 30 and full.iterations == 30
    assert len(stopped.objective) == stopped.iterations
    assert torch.equal(stopped.centroids, full.centroids) and torch.equal(stopped.labels, full.labels)
    assert stopped.objective == pytest.approx(full.objective[:stopped.iterations], rel=1e-12)
    # every iteration after the fixed point repeats the last objective (bounded: skipped rows count their
    # float64 distance, computed rows their float32 one, so the sum moves by float rounding)
    rel = 1e-6 if bounded else 1e-12
    assert full.objective[stopped.iterations:] == pytest.approx([stopped.objective[-1]] * (30 - stopped.iterations),
                                                                rel=rel)


def test_no_stop_while_empty_clusters_are_being_split():
    """Labels that repeat after an update that split an empty cluster are no fixed point: the next update
    splits again with a new draw. Three groups of identical points (small integers) and a centroid nobody
    is near: a split copies a group's centroid scaled by 1 +- 1/1024 exactly, both halves tie, the lower
    index takes the group, the other half empties, and the labels often repeat right after a split."""
    groups = torch.tensor([[1.0, 2.0, 3.0, 4.0], [9.0, -2.0, 5.0, 1.0], [-4.0, 6.0, -8.0, 2.0]])
    x = groups.repeat_interleave(50, 0)
    init = torch.cat([torch.full((1, 4), 1e4), groups])
    for seed in range(6):
        stopped = kmeans(x, 4, niter=15, seed=seed, backend="torch", init_centroids=init, bounded=False)
        full = kmeans(x, 4, niter=15, seed=seed, backend="torch", init_centroids=init, bounded=False,
                      stop_at_fixed_point=False)
        assert full.splits == 15  # a split in every iteration: there is no fixed point to stop at
        assert stopped.iterations == 15
        assert torch.equal(stopped.centroids, full.centroids) and torch.equal(stopped.labels, full.labels)


@pytest.mark.parametrize("level", LEVELS)
def test_assign_labels_are_the_exact_arg_min_under_near_ties(level):
    """Centroids closer together than float32 can resolve (relative gaps ~1e-8 of the scores): the float32
    GEMM order is noise, so every label must come from the float64 settle (both ops, every level)."""
    if level not in supported_levels():
        pytest.skip(f"CPU lacks {level}")
    generator = torch.Generator().manual_seed(13)
    base = torch.randn(32, generator=generator) * 10
    centroids = base + 1e-4 * torch.randn(70, 32, generator=generator)  # all within float32 noise ...
    centroids[:32] = torch.randn(32, 32, generator=generator) * 10       # ... or far apart, but pairs j, j + 16
    centroids[16:32] = centroids[:16] + 1e-5 * torch.randn(16, 32, generator=generator)  # (one SIMD lane) tie
    x = torch.cat([base + 1e-2 * torch.randn(1500, 32, generator=generator),
                   centroids[:16].repeat(90, 1) + 1e-2 * torch.randn(1440, 32, generator=generator)])
    exact = torch.cdist(x.double(), centroids.double()).pow(2).argmin(1)
    order = torch.randperm(70, generator=generator)
    with cpu_capability_level(level):
        labels, _ = torch.ops.pydc.kmeans_assign(x, centroids, None, True)
        bounded_labels = torch.ops.pydc.kmeans_assign_bounds(x, centroids[order], order, torch.tensor([0, 30, 70]),
                                                             (x * x).sum(1))[0]
    assert torch.equal(labels, exact)
    assert torch.equal(bounded_labels, exact)


@pytest.mark.parametrize("k", [20, 100, 1000, 1100])
def test_balanced_groups_fill_to_capacity_nearest_first(k):
    """Yinyang's groups: every centroid placed, no group above its capacity (16 up to 1024 centroids, so the
    16-lane pairs of the local filter run full), and a centroid is away from its nearest centre only when
    every centre nearer to it is full."""
    from pydc.cluster.kmeans_bounded import balanced_groups, group_layout

    groups, capacity = group_layout(k)
    assert groups * capacity >= k and capacity % 16 == 0 and (k > 1024 or capacity == 16)
    generator = torch.Generator().manual_seed(k)
    centroids = clustered(n=k, d=8, centres=max(2, k // 40), seed=k)  # uneven natural groups
    centres = centroids[torch.randperm(k, generator=generator)[:groups]]
    group = balanced_groups(centroids, centres, capacity)
    assert torch.equal(group, balanced_groups(centroids, centres, capacity))
    counts = torch.bincount(group, minlength=groups)
    assert int(counts.sum()) == k and int(counts.max()) <= capacity
    distance = torch.cdist(centroids.double(), centres.double())
    own = distance.gather(1, group.unsqueeze(1)).squeeze(1)
    for j in torch.nonzero(own > distance.min(1).values).squeeze(1).tolist():
        assert torch.all(counts[distance[j] < own[j]] == capacity)


def test_balanced_groups_with_room_to_spare_are_nearest_centre():
    from pydc.cluster.kmeans_bounded import balanced_groups

    centroids = unstructured(n=300, d=6)
    centres = centroids[:7]
    assert torch.equal(balanced_groups(centroids, centres, 300), torch.cdist(centroids.double(),
                                                                             centres.double()).argmin(1))
    with pytest.raises(ValueError, match="cannot hold"):
        balanced_groups(centroids, centres, 40)


@pytest.mark.parametrize("screen", ["off", "on"])
def test_auto_hands_unstructured_data_over_to_moved_products(screen, monkeypatch):
    """auto keeps Yinyang's bounds where their filter pays (clustered data) and hands over to the moved
    products once it does not (points on the sphere), through Elkan's bounds while many labels change unless
    the full passes are bfloat16-screened, with plain Lloyd's run either way; spherical runs and products over
    the memory budget stay with Yinyang."""
    from pydc.cluster import kmeans_bounded
    from pydc.ops import bf16_screen

    if screen == "on" and not bf16_screen.available():
        pytest.skip("needs MKL's bfloat16 GEMM in torch")
    monkeypatch.setenv(bf16_screen.ENV_VAR, screen)
    monkeypatch.setenv("PYDC_KMEANS_BOUNDS", "auto")
    unstructured_chain = "yinyang+elkan+delta" if screen == "off" else "yinyang+delta"
    for x, k, expected in ((clustered(), 40, "yinyang"), (unstructured(n=6000, d=32), 60, unstructured_chain)):
        init = initial_centroids(x, k, seed=7)
        plain = kmeans(x, k, niter=15, backend="torch", init_centroids=init, bounded=False)
        bounded = kmeans(x, k, niter=15, backend="torch", init_centroids=init, bounded=True)
        assert_same_run(bounded, plain)
        assert bounded.bounds == expected
    assert kmeans_bounded.choose_bounds(6000, 60, spherical=True) == "yinyang"
    monkeypatch.setattr(kmeans_bounded, "ELKAN_MAX_BYTES", 6000 * 60 * 4 - 1)
    assert kmeans_bounded.choose_bounds(6000, 60) == "yinyang"
    monkeypatch.setenv("PYDC_KMEANS_BOUNDS", "delta")
    with pytest.raises(ValueError, match="PYDC_KMEANS_BOUNDS=delta needs"):
        kmeans_bounded.choose_bounds(6000, 60)


def test_yinyang_predicts_the_scores_of_its_next_filter():
    """predicted_fraction, computed before a filtered pass from the bounds on every 16th point, tracks the
    fraction that pass then scores on unstructured data and does not overstate it where the separation filter
    settles points (clustered data); auto hands unstructured data over before the second pass, whose filter
    would score nearly every pair."""
    from pydc.cluster.kmeans_bounded import YinyangAssigner
    from pydc.cluster.kmeans_delta import YinyangThenDelta

    for x, k, tolerance in ((unstructured(n=6000, d=32), 60, 0.1), (clustered(), 40, None)):
        norms = (x * x).sum(1)
        yinyang = YinyangAssigner(x, norms, k, group_seed=2)
        centroids, filtered = initial_centroids(x, k, seed=7), 0
        for _ in range(10):
            predicted = yinyang.predicted_fraction(centroids)
            labels, _ = yinyang(centroids)
            if predicted is not None:
                filtered += 1
                scored = yinyang.scores_computed[-1] / (x.shape[0] * k)
                assert predicted <= scored + 0.02 if tolerance is None else abs(predicted - scored) <= tolerance
            sums, counts = torch.ops.pydc.kmeans_update(x, labels, k, True)
            centroids = sums / counts.clamp_min(1).unsqueeze(1)
        assert filtered >= 5
    x = unstructured(n=6000, d=32)
    norms = (x * x).sum(1)
    auto = YinyangThenDelta(YinyangAssigner(x, norms, 60, group_seed=2), x, norms, 60)
    labels, _ = auto(initial_centroids(x, 60, seed=7))
    sums, counts = torch.ops.pydc.kmeans_update(x, labels, 60, True)
    auto(sums / counts.clamp_min(1).unsqueeze(1))
    assert len(auto.yinyang.scores_computed) == 1 and len(auto.scores_computed) == 2
    assert auto.used in ("yinyang+elkan", "yinyang+delta")


@pytest.mark.parametrize("gemm", ["torch", "pydc"])
def test_auto_runs_elkan_between_yinyang_and_delta(monkeypatch, restore_cpu_gemm, gemm):
    """Unscreened, auto's unstructured run goes Yinyang (first pass), Elkan (a plain pass right after the
    first, then dense and sparse passes), delta (once few labels change, in the memory of Elkan's bounds: its
    dense and moved passes run there, with the points packed after the products under pydc's GEMM), and is
    plain Lloyd's run; the released Elkan assigner refuses passes. Under either GEMM, whichever this machine
    would choose."""
    from pydc.cluster import kmeans_delta
    from pydc.cluster.kmeans_bounded import YinyangAssigner
    from pydc.cluster.kmeans_delta import DeltaAssigner, YinyangThenDelta
    from pydc.ops import bf16_screen, cpu_gemm

    monkeypatch.setenv(bf16_screen.ENV_VAR, "off")
    assert cpu_gemm.use_cpu_gemm(gemm) == gemm
    x, k = unstructured(n=6000, d=32), 60
    norms = (x * x).sum(1)
    init = initial_centroids(x, k, seed=7)
    plain = kmeans(x, k, niter=24, backend="torch", init_centroids=init, bounded=False)
    auto = YinyangThenDelta(YinyangAssigner(x, norms, k, group_seed=2), x, norms, k)
    handed = []
    original = kmeans_delta.DeltaAssigner.__init__
    monkeypatch.setattr(kmeans_delta.DeltaAssigner, "__init__",
                        lambda self, *a, **kw: (handed.append(kw.get("memory")), original(self, *a, **kw))[1])
    centroids = init
    for _ in range(24):  # Elkan hands over after the 16th pass
        labels, _ = auto(centroids)
        sums, counts = torch.ops.pydc.kmeans_update(x, labels, k, True)
        centroids = sums / counts.clamp_min(1).unsqueeze(1)
    assert torch.equal(auto(centroids)[0], plain.labels) and auto.used == "yinyang+elkan+delta"
    elkan, delta = auto.elkan, auto.delta
    assert len(auto.yinyang.scores_computed) == 1 and len(auto.scores_computed) == 25
    assert elkan.passes[:2] == ["plain", "dense"] and "sparse" in elkan.passes
    assert elkan.rows_computed[0] == x.shape[0] and elkan.anchors is None
    assert handed[0] is not None and delta.dots.data_ptr() == handed[0].data_ptr()
    # the points packed for pydc's GEMM follow the products in the same memory, where that GEMM is chosen
    assert (delta.packed_x is not None) == (gemm == "pydc")
    if delta.packed_x is not None:
        assert delta.packed_x.data_ptr() == handed[0].data_ptr() + 4 * handed[0].numel() - 4 * delta.packed_x.numel()
    assert delta.passes[0] == "dense" and "moved" in delta.passes
    with pytest.raises(RuntimeError, match="after release"):
        elkan(centroids)
    with pytest.raises(ValueError, match="memory must be 6000 x 60 contiguous float32"):
        DeltaAssigner(x, norms, k, memory=torch.empty(6000, 59))


def test_packed_points_only_with_pydcs_gemm_and_within_the_budget(monkeypatch):
    """The memory a run's Elkan bounds and delta products share holds delta's packed points (a copy of x) only
    where pydc's GEMM is chosen and they fit ELKAN_MAX_BYTES; otherwise it is the N x k state alone."""
    from pydc.cluster import kmeans_bounded
    from pydc.ops import cpu_gemm

    monkeypatch.setattr(cpu_gemm, "ensure_cpu_gemm", lambda: "pydc")
    packed = kmeans_bounded.packed_points_floats(1000, 64)
    assert packed == 1024 * 64 + kmeans_bounded.PACKED_HEADER
    assert kmeans_bounded.pair_state_floats(1000, 50, 64) == 1000 * 50 + packed
    monkeypatch.setattr(kmeans_bounded, "ELKAN_MAX_BYTES", 4 * packed - 1)
    assert kmeans_bounded.pair_state_floats(1000, 50, 64) == 1000 * 50
    monkeypatch.setattr(kmeans_bounded, "ELKAN_MAX_BYTES", 4 * packed)
    assert kmeans_bounded.pair_state_floats(1000, 50, 64) == 1000 * 50 + packed
    monkeypatch.setattr(cpu_gemm, "ensure_cpu_gemm", lambda: "torch")
    assert kmeans_bounded.pair_state_floats(1000, 50, 64) == 1000 * 50


@pytest.mark.parametrize("screen", ["off", "on"])
def test_delta_passes_plain_or_screened_then_kept_then_moved(screen, monkeypatch):
    """With the default limits a run of moved products starts with passes that keep nothing (plain
    kmeans_assign, or kmeans_assign_bf16 where PYDC_KMEANS_BF16 says so), keeps the products once few labels
    change and then moves them; the run is plain Lloyd's either way."""
    from pydc.ops import bf16_screen

    if screen == "on" and not bf16_screen.available():
        pytest.skip("needs MKL's bfloat16 GEMM in torch")
    monkeypatch.setenv("PYDC_KMEANS_BOUNDS", "delta")
    monkeypatch.setenv(bf16_screen.ENV_VAR, screen)
    x = unstructured(n=4000, d=16)  # 700 labels change in the first update, 101 in the seventh, 55 in the tenth
    init = initial_centroids(x, 100, seed=7)
    plain = kmeans(x, 100, niter=20, backend="torch", init_centroids=init, bounded=False)
    from pydc.cluster import kmeans_delta

    calls = []
    original = kmeans_delta.DeltaAssigner.__call__
    monkeypatch.setattr(kmeans_delta.DeltaAssigner, "__call__",
                        lambda self, c: (calls.append(self), original(self, c))[1])
    bounded = kmeans(x, 100, niter=20, backend="torch", init_centroids=init, bounded=True)
    assert_same_run(bounded, plain)
    passes = calls[-1].passes
    first = "screened" if screen == "on" else "plain"
    assert passes[0] == first and "dense" in passes and "moved" in passes, passes
    assert passes.index("dense") < passes.index("moved") and set(passes[:passes.index("dense")]) == {first}


@pytest.mark.parametrize("bounds", ["yinyang", "auto"])
def test_bounded_with_the_bf16_screen_equals_plain_lloyd(bounds, monkeypatch):
    """The same runs with every full pass screened by bfloat16 (PYDC_KMEANS_BF16=on: Yinyang's bounds from the
    screen, the plain passes of the moved products screened): plain Lloyd's run still, on every kind of data."""
    from pydc.ops import bf16_screen

    if not bf16_screen.available():
        pytest.skip("needs MKL's bfloat16 GEMM in torch")
    monkeypatch.setenv("PYDC_KMEANS_BOUNDS", bounds)
    monkeypatch.setenv(bf16_screen.ENV_VAR, "on")
    for case in sorted(CASES):
        x, k, start = CASES[case]()
        init = empty_cluster_start(x, k) if start == "empty" else initial_centroids(x, k, seed=7)
        plain = kmeans(x, k, niter=12, seed=5, backend="torch", init_centroids=init, bounded=False)
        bounded = kmeans(x, k, niter=12, seed=5, backend="torch", init_centroids=init, bounded=True)
        assert_same_run(bounded, plain)
