"""pydc::kmeans_assign_delta, one assignment pass of k-means from kept point-centroid products moved by the
points that changed label: its labels are kmeans_assign's for the new centroids through a Lloyd run, every
product it keeps is within its stated error bound of the exact product, centroids that are not the means of
the last labels fall back to a dense pass, and bad arguments are refused with a message."""

from __future__ import annotations

import pytest
import torch

from pydc.cluster.kmeans import initial_centroids
from pydc.cluster.kmeans_bounded import PACKED_HEADER, packed_points_floats
from pydc.cluster.kmeans_delta import LAYOUT_ROWS, TOP_SLOTS, empty_tops, products_by_centroid
from pydc.ops import cpu_gemm
from pydc.ops._registry import HAS_OPS
from pydc.ops.cpu_capability import LEVELS, cpu_capability_level, cpu_vector_width, supported_levels

pytestmark = pytest.mark.skipif(not HAS_OPS, reason="needs the compiled pydc ops")


def clustered(n, d, centres, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, d, generator=generator) * scale
    return means[torch.randint(0, centres, (n,), generator=generator)] + torch.randn(n, d, generator=generator)


class Pass:
    """The state a caller keeps between passes, as pydc.cluster.kmeans_delta.DeltaAssigner does."""

    def __init__(self, x, k, packed=False):
        n, d = x.shape
        self.packed_x = torch.empty(packed_points_floats(n, d)) if packed else None
        self.x, self.norms = x, (x * x).sum(1)
        self.labels = torch.zeros(n, dtype=torch.int64)
        self.dots = torch.empty(k * n, dtype=torch.float32)
        self.column_error = torch.zeros(k, dtype=torch.float64)
        self.basis_labels = torch.zeros(n, dtype=torch.int64)
        self.basis_centroids = torch.zeros((k, d), dtype=torch.float32)
        self.tops = empty_tops(n)
        self.started = False

    def __call__(self, centroids, dense_changes=1e9):
        changes = dense_changes if self.started else -1.0
        self.started = True
        return torch.ops.pydc.kmeans_assign_delta(self.x, centroids, self.norms, changes, self.labels, self.dots,
                                                  self.column_error, self.basis_labels, self.basis_centroids,
                                                  self.tops, self.packed_x)

    def packed_layout(self):
        """The header kmeans_assign_delta wrote behind the packed points: (panel rows, N, d), zeros when not valid."""
        return self.packed_x[-PACKED_HEADER:].view(torch.int64)[:3].tolist()


def lloyd_update(x, labels, k):
    sums, counts = torch.ops.pydc.kmeans_update(x, labels, k, True)
    return torch.where((counts > 0).unsqueeze(1), sums / counts.clamp_min(1).unsqueeze(1), torch.zeros_like(sums))


def in_layout(products):
    """The k x N products laid out as kmeans_assign_delta keeps them (the inverse of products_by_centroid)."""
    k, n = products.shape
    return torch.cat([products[:, b:b + LAYOUT_ROWS].reshape(-1) for b in range(0, n, LAYOUT_ROWS)])


def assert_products_within_bound(state, centroids):
    """Every kept product is within ||x_i|| column_error[j] of the exact x_i . c_j."""
    exact = centroids.double() @ state.x.double().T
    gap = (products_by_centroid(state.dots, state.x.shape[0], centroids.shape[0]).double() - exact).abs()
    allowed = state.column_error.unsqueeze(1) * state.x.double().norm(dim=1).unsqueeze(0)
    assert bool((gap <= allowed).all()), f"a product is off by {float((gap - allowed).max())} beyond its bound"


def assert_top_lists_hold(state, centroids, rounding=1e-6):
    """Every point's top list (state.tops: TOP_SLOTS scores ascending, their centroids, the floor) holds for
    the kept products: each listed score is the point's score against that centroid under them, no listed
    score is above the floor, and every score not listed is at or above it, up to the scores' float32
    rounding (taken as `rounding` times ||c||^2 + 2 |product|)."""
    n, k = state.x.shape[0], centroids.shape[0]
    products = products_by_centroid(state.dots, n, k).double()
    norms = (centroids.double() ** 2).sum(1, keepdim=True)
    scores, slack = norms - 2 * products, rounding * (norms + 2 * products.abs())
    listed, names = state.tops[:TOP_SLOTS].double(), state.tops[TOP_SLOTS:2 * TOP_SLOTS]
    floor = state.tops[-1].double()
    assert not bool(floor.isnan().any()), "a list is not valid after a pass"
    used = names >= 0
    assert bool((used[:-1] >= used[1:]).all()), "an empty slot before a used one"
    assert bool((listed[:-1][used[1:]] <= listed[1:][used[1:]]).all()), "listed scores out of order"
    slots = names.clamp_min(0).long()
    off = (scores.gather(0, slots) - listed).abs() - slack.gather(0, slots)
    assert bool((off[used] <= 0).all()), "a listed score is not the point's score"
    assert bool((listed[used] <= floor.expand_as(listed)[used]).all()), "a listed score above the floor"
    unlisted = torch.ones((k + 1, n), dtype=torch.bool).scatter_(0, torch.where(used, slots, k), False)[:k]
    below = (scores + slack < floor.unsqueeze(0)) & unlisted
    assert not bool(below.any()), "a score below the floor is not listed"


def assert_kmeans_assign_labels(state, centroids, distances):
    labels, plain_distances = torch.ops.pydc.kmeans_assign(state.x, centroids, state.norms, True)
    assert torch.equal(state.labels, labels)
    torch.testing.assert_close(distances, plain_distances.double(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("data", ["clustered", "unstructured"])
def test_lloyd_passes_give_kmeans_assign_labels_within_the_bound(data, level):
    if level not in supported_levels():
        pytest.skip(f"CPU lacks {level}")
    n, d, k = 2503, 20, 30  # 2503: blocks of up to 1024 points, a ragged last one, lanes of 4, 8 and 16
    if data == "clustered":
        x = clustered(n, d, centres=k, seed=9)
    else:
        x = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(9)), dim=1)
    centroids = initial_centroids(x, k, seed=1)
    state = Pass(x, k)
    moved = []
    with cpu_capability_level(level):
        for step in range(12):
            distances, counts = state(centroids)
            assert_kmeans_assign_labels(state, centroids, distances)
            assert_products_within_bound(state, centroids)
            assert_top_lists_hold(state, centroids)
            settled, products, dense = counts.tolist()
            if step == 0:
                assert dense == 1 and products == n * k
            if not dense:
                moved.append(products // n)
            centroids = lloyd_update(x, state.labels, k)
    # most passes from the second update on move the products (the first one's basis are the initial
    # centroids, which are no cluster means: its residual sends it to a dense pass; so do empty clusters'
    # refills and error bounds grown past the limit, on these small clusters)
    assert len(moved) >= 6 and sum(moved) > 0


@pytest.mark.parametrize("n", [40, 1024, 1041, 2 * LAYOUT_ROWS + 16])
@pytest.mark.parametrize("threads", [1, 3])
def test_products_keep_their_layout_for_any_n_and_thread_count(n, threads):
    """The products' blocks of LAYOUT_ROWS points (split further between threads when n is small) hold every
    product where products_by_centroid reads it, through dense and moved passes, with any thread count."""
    x = torch.nn.functional.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(n)), dim=1)
    k = 7
    matrix = torch.arange(k * n, dtype=torch.float32).view(k, n)
    assert torch.equal(products_by_centroid(in_layout(matrix), n, k), matrix)
    centroids = initial_centroids(x, k, seed=3)
    state = Pass(x, k)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(4):
            distances, _ = state(centroids)
            assert_kmeans_assign_labels(state, centroids, distances)
            assert_products_within_bound(state, centroids)
            centroids = lloyd_update(x, state.labels, k)
    finally:
        torch.set_num_threads(previous)


def test_dense_changes_decides_between_a_dense_and_a_delta_pass():
    x = clustered(n=900, d=8, centres=12, seed=2)
    states = [Pass(x, 12), Pass(x, 12)]
    for state in states:
        state(initial_centroids(x, 12, seed=0))
        state(lloyd_update(x, state.labels, 12))
    changed = int((states[0].labels != states[0].basis_labels).sum())
    assert changed > 0
    centroids = lloyd_update(x, states[0].labels, 12)
    plain = torch.ops.pydc.kmeans_assign(x, centroids, None, True)[0]
    _, counts = states[0](centroids, dense_changes=(changed - 1) / 12)  # one changed label too many: dense
    assert counts.tolist()[1:] == [900 * 12, 1]
    _, counts = states[1](centroids, dense_changes=changed / 12)  # exactly as many: the products are moved
    assert counts.tolist()[1:] == [900 * changed, 0]
    assert torch.equal(states[0].labels, plain) and torch.equal(states[1].labels, plain)
    # on to the fixed point: a pass that changes no label, and after it one with nothing to move
    state = states[1]
    for _ in range(50):
        state(lloyd_update(x, state.labels, 12))
        if torch.equal(state.labels, state.basis_labels):
            break
    assert torch.equal(state.labels, state.basis_labels)
    centroids = lloyd_update(x, state.labels, 12)
    _, counts = state(centroids, dense_changes=0.0)
    assert counts.tolist()[1:] == [0, 0]
    assert torch.equal(state.labels, torch.ops.pydc.kmeans_assign(x, centroids, None, True)[0])


def test_centroids_that_are_not_means_get_a_dense_pass():
    """The residual of the update formula catches centroids moved by anything but a Lloyd update (a split,
    a renormalisation, a caller's own centroids): the pass is dense, and the labels still kmeans_assign's."""
    x = clustered(n=800, d=10, centres=10, seed=3)
    state = Pass(x, 10)
    state(initial_centroids(x, 10, seed=0))
    means = lloyd_update(x, state.labels, 10)
    state(means)
    for shift in (1e-3, 0.1):
        centroids = lloyd_update(x, state.labels, 10)
        centroids[4] += shift  # one centroid is not its cluster's mean
        distances, counts = state(centroids)
        assert counts.tolist()[2] == 1
        assert_kmeans_assign_labels(state, centroids, distances)
        assert_products_within_bound(state, centroids)


def test_near_ties_and_duplicates_match_kmeans_assign():
    """Points exactly between two centroids and repeated points: their rows are settled in float64, ties to
    the lowest index, through moved products."""
    generator = torch.Generator().manual_seed(6)
    base = torch.randn(40, 6, generator=generator).round()
    midpoints = (base[0:20:2] + base[1:20:2]) / 2
    x = torch.cat([base.repeat(5, 1), midpoints.repeat(8, 1), torch.randn(300, 6, generator=generator)])
    centroids = base[:10].clone()
    centroids[3] = centroids[7]  # two equal centroids: exact ties go to the lower index
    state = Pass(x, 10)
    settled_total = 0
    for _ in range(6):
        distances, counts = state(centroids)
        assert_kmeans_assign_labels(state, centroids, distances)
        settled_total += counts.tolist()[0]
        centroids = lloyd_update(x, state.labels, 10)
    assert settled_total > 0


@pytest.fixture
def pydc_gemm():
    """pydc's own GEMM behind the CPU k-means passes (the one whose panels packed_x holds), then the process's
    choice again."""
    from pydc import _C

    previous = _C.cpu_gemm()
    cpu_gemm.use_cpu_gemm("pydc")
    yield
    cpu_gemm.use_cpu_gemm(previous)


def run_packed_and_not(x, k, steps, level=None, threads=2):
    """Two states through the same Lloyd run, one with packed_x, one without; checks every pass of both."""
    states = [Pass(x, k, packed=True), Pass(x, k)]
    centroids = initial_centroids(x, k, seed=1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with cpu_capability_level(level or "default"):
            kinds = []
            for _ in range(steps):
                (d_packed, c_packed), (d_plain, c_plain) = states[0](centroids), states[1](centroids)
                assert torch.equal(states[0].labels, states[1].labels) and torch.equal(c_packed, c_plain)
                assert torch.equal(states[0].dots, states[1].dots) and torch.equal(d_packed, d_plain)
                assert_kmeans_assign_labels(states[0], centroids, d_packed)
                kinds.append(c_packed.tolist()[2])
                centroids = lloyd_update(x, states[0].labels, k)
    finally:
        torch.set_num_threads(previous)
    return states[0], kinds, centroids


@pytest.mark.parametrize("level", LEVELS)
def test_packed_points_give_the_same_passes(level, pydc_gemm):
    """With packed_x the dense pass packs the points there and marks the layout (the level's panel rows, N, d);
    the moved passes multiply them from there: the same labels, products and distances, bit for bit."""
    if level not in supported_levels():
        pytest.skip(f"CPU lacks {level}")
    x = torch.nn.functional.normalize(torch.randn(2503, 20, generator=torch.Generator().manual_seed(4)), dim=1)
    state, kinds, _ = run_packed_and_not(x, 30, steps=8, level=level)
    assert kinds[0] == 1 and 0 in kinds  # a dense pass, then moved ones
    with cpu_capability_level(level):
        panel = 2 * cpu_vector_width()
    assert state.packed_layout() == [panel, 2503, 20]
    packed = state.packed_x[:-PACKED_HEADER].view(-1, 20, panel)  # panel p holds points p * panel ..., by feature
    assert torch.equal(packed[:2503 // panel].transpose(1, 2).reshape(-1, 20), x[:2503 // panel * panel])


def test_packed_points_are_used_only_in_their_layout(pydc_gemm):
    """A moved pass reads packed_x only when its header matches the level, N and d: panels packed at another
    level (or damaged ones under a header that does not match) are ignored, not misread."""
    levels = [level for level in LEVELS if level in supported_levels()]
    x = torch.nn.functional.normalize(torch.randn(2503, 20, generator=torch.Generator().manual_seed(5)), dim=1)
    state, _, centroids = run_packed_and_not(x, 30, steps=3, level=levels[-1])
    # damaged panels under a header for other rows: the next passes pack their own, exact
    state.packed_x[:-PACKED_HEADER] = 0.0
    header = state.packed_x[-PACKED_HEADER:].view(torch.int64)
    with cpu_capability_level(levels[-1]):
        panel = 2 * cpu_vector_width()
        for wrong in ([panel, 2502, 20], [panel, 2503, 19], [panel // 2, 2503, 20]):
            header[:3] = torch.tensor(wrong)
            saved = (state.labels.clone(), state.dots.clone(), state.column_error.clone(),
                     state.basis_labels.clone(), state.basis_centroids.clone(), state.tops.clone())
            distances, counts = state(centroids)
            assert counts.tolist()[2] == 0  # a moved pass
            assert_kmeans_assign_labels(state, centroids, distances)
            assert_products_within_bound(state, centroids)
            (state.labels, state.dots, state.column_error, state.basis_labels, state.basis_centroids,
             state.tops) = saved
    # under the matching header the damaged panels are read: proof that the moved pass multiplies them
    with cpu_capability_level(levels[-1]):
        header[:3] = torch.tensor([panel, 2503, 20])
        state(centroids)
        with pytest.raises(AssertionError):
            assert_products_within_bound(state, centroids)
    if len(levels) > 1:  # packed at one level, moved at another: the layouts differ, the passes stay exact
        state, _, centroids = run_packed_and_not(x, 30, steps=2, level=levels[0])
        with cpu_capability_level(levels[-1]):
            distances, counts = state(centroids)
            assert counts.tolist()[2] == 0
            assert_kmeans_assign_labels(state, centroids, distances)
            assert_products_within_bound(state, centroids)


def test_bad_arguments_are_refused():
    x = torch.randn(20, 4)
    state = Pass(x, 3)
    centroids = torch.randn(3, 4)
    op = torch.ops.pydc.kmeans_assign_delta
    args = (state.labels, state.dots, state.column_error, state.basis_labels, state.basis_centroids,
            state.tops)
    with pytest.raises(RuntimeError, match="dots of shape"):
        op(x, centroids, state.norms, -1.0, state.labels, torch.empty(3, 20), state.column_error,
           state.basis_labels, state.basis_centroids, state.tops)
    with pytest.raises(RuntimeError, match="column_error"):
        op(x, centroids, state.norms, -1.0, state.labels, state.dots, state.column_error.float(),
           state.basis_labels, state.basis_centroids, state.tops)
    with pytest.raises(RuntimeError, match="basis_centroids"):
        op(x, centroids, state.norms, -1.0, state.labels, state.dots, state.column_error, state.basis_labels,
           torch.zeros(3, 5), state.tops)
    with pytest.raises(RuntimeError, match="dtype Float"):
        op(x.double(), centroids, state.norms, -1.0, *args)
    with pytest.raises(RuntimeError, match="NaN"):
        op(x, centroids, state.norms, float("nan"), *args)
    with pytest.raises(RuntimeError, match="packed_x"):
        op(x, centroids, state.norms, -1.0, *args, torch.empty(packed_points_floats(20, 4), dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"packed_x contiguous with 0 or at least 136 elements"):
        op(x, centroids, state.norms, -1.0, *args, torch.empty(135))
    state(centroids)
    bad = state.labels.clone()
    bad[4] = 3
    with pytest.raises(RuntimeError, match="labels and basis_labels in"):
        op(x, centroids, state.norms, 1.0, bad, state.dots, state.column_error, state.basis_labels,
           state.basis_centroids, state.tops)
    # a refused call changed nothing: the next pass still gives kmeans_assign's labels
    distances, _ = state(centroids)
    assert_kmeans_assign_labels(state, centroids, distances)


def test_fake_matches_the_kernel():
    """torch.library.opcheck: the schema (labels and the state mutated in place) and the fake tensors agree with
    the kernel, so torch.compile can trace code that calls it; a dense and a delta pass."""
    x = clustered(n=300, d=12, centres=10, seed=2)
    state = Pass(x, 10)
    centroids = initial_centroids(x, 10, seed=1)
    state(centroids)
    centroids = lloyd_update(x, state.labels, 10)
    for changes, packed in ((-1.0, None), (1e9, None), (-1.0, torch.zeros(packed_points_floats(300, 12)))):
        arguments = (x, centroids, state.norms, changes, state.labels.clone(), state.dots.clone(),
                     state.column_error.clone(), state.basis_labels.clone(), state.basis_centroids.clone(),
                     state.tops.clone(), packed)
        torch.library.opcheck(torch.ops.pydc.kmeans_assign_delta.default, arguments,
                              test_utils=("test_schema", "test_faketensor"))


def test_products_anywhere_within_their_bound_give_exact_labels():
    """The op's contract: labels are exact for any kept products within ||x_i|| column_error[j] of the exact ones.
    Exact ties (midpoints of integer centroids) with every product pushed to the edge of a grown bound, in favour
    of the higher-index centroid: the float32 ranking then picks the wrong one by more than kmeans_assign's own
    margin, and only the bound's share of the margin sends those rows to the float64 settle."""
    generator = torch.Generator().manual_seed(11)
    centroids = torch.randn(12, 16, generator=generator).mul(4).round()
    pairs = torch.arange(12).view(6, 2)
    x = torch.cat([(centroids[pairs[:, 0]] + centroids[pairs[:, 1]]) / 2,
                   centroids + torch.randn(12, 16, generator=generator)])
    state = Pass(x, 12)
    state(centroids)  # dense: exact products up to the GEMM's error
    state.basis_labels.copy_(state.labels)  # the same centroids again: a pass that moves nothing
    gamma = 18 * 2.0 ** -24 / (1 - 18 * 2.0 ** -24)
    state.column_error.copy_(6 * gamma * centroids.double().norm(dim=1))  # grown, under the dense limit (8x)
    exact = centroids.double() @ x.double().T
    edge = state.column_error.unsqueeze(1) * x.double().norm(dim=1).unsqueeze(0) * 0.9  # float32 rounding inside
    # lower-index centroids look farther (smaller product), higher-index ones nearer (larger product)
    sign = torch.where(torch.arange(12).unsqueeze(1) < 6, -1.0, 1.0).double()
    sign[pairs[:, 0]] = -1.0
    sign[pairs[:, 1]] = 1.0
    state.dots.copy_(in_layout((exact + sign * edge).float()))
    state.tops.fill_(float("nan"))  # the top lists follow the products: not valid once these are replaced
    assert_products_within_bound(state, centroids)
    distances, counts = state(centroids, dense_changes=0.0)
    assert counts.tolist()[1:] == [0, 0]  # a moved pass (nothing to move): the kept products decided
    assert counts.tolist()[0] >= 6  # the tied midpoints were settled
    labels, plain_distances = torch.ops.pydc.kmeans_assign(x, centroids, state.norms, True)
    assert torch.equal(state.labels, labels)
    # a distance from an unsettled row's kept product errs by up to twice its product's bound
    torch.testing.assert_close(distances, plain_distances.double(), rtol=0, atol=2.5 * float(edge.max()))
    assert torch.equal(state.labels[:6], pairs[:, 0])  # exact ties go to the lower index


def run_to_moved_passes(x, k, passes):
    """A state after a dense pass and `passes` moved ones (Lloyd updates between), and the next centroids."""
    state = Pass(x, k)
    centroids = initial_centroids(x, k, seed=4)
    for _ in range(passes + 2):
        state(centroids)
        centroids = lloyd_update(x, state.labels, k)
    return state, centroids


@pytest.mark.parametrize("damage", ["all", "few", "out_of_range"])
def test_top_lists_not_valid_are_folded_again(damage):
    """The per-point top lists (the best scores under the kept products, and a floor under the rest) that a
    moved pass reads instead of the runs of centroids nothing moved: lists marked not valid (floor NaN) are
    folded again from the products, a whole block at once when many are or point by point when few are, and
    lists naming centroids out of range are treated as not valid; the labels stay kmeans_assign's."""
    generator = torch.Generator().manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(2100, 16, generator=generator), dim=1)
    state, centroids = run_to_moved_passes(x, 24, passes=2)
    if damage == "all":
        state.tops.fill_(float("nan"))
    elif damage == "few":
        state.tops[-1, [3, 700, 1500]] = float("nan")
    else:
        state.tops[4, 10] = 24.0   # the best listed centroid past k - 1
        state.tops[5, 11] = -7.0   # a second listed centroid below 0
        state.tops[4, 12] = 1e30
    for _ in range(3):
        distances, counts = state(centroids)
        assert counts.tolist()[2] == 0, "expected moved passes"
        assert_kmeans_assign_labels(state, centroids, distances)
        assert_top_lists_hold(state, centroids)
        centroids = lloyd_update(x, state.labels, 24)


def test_centroids_moved_within_the_bound_are_scored_again():
    """A centroid moved by something other than the labels, by less than sends the pass to a dense one (the
    residual of the update formula is in the products' error bound): its products stay, but every point's
    score against it changes with ||c||^2, so the lists take its new scores like those of the centroids the
    labels moved. From a fixed point, where no label moves any centroid."""
    generator = torch.Generator().manual_seed(8)
    x = torch.nn.functional.normalize(torch.randn(1500, 16, generator=generator), dim=1)
    state, centroids = run_to_moved_passes(x, 10, passes=2)
    for _ in range(60):
        state(centroids)
        centroids = lloyd_update(x, state.labels, 10)
        if torch.equal(state.labels, state.basis_labels):
            break
    assert torch.equal(state.labels, state.basis_labels), "no fixed point reached"
    state(centroids, dense_changes=-1.0)  # a dense pass resets the products' error bound
    centroids[3] += 4e-6 * centroids[3] / centroids[3].norm()  # ||c_3||^2 grows by ~8e-6 ||c_3||
    distances, counts = state(centroids)
    assert counts.tolist()[1:] == [0, 0], "expected a moved pass with nothing to move"
    assert_kmeans_assign_labels(state, centroids, distances)
    assert_top_lists_hold(state, centroids)


def test_a_single_listed_score_is_settled_against_the_floor():
    """A point's second-best score is bounded by its list's floor as well as by its second listed score:
    points whose list holds one centroid, the higher of two at exactly the same distance (midpoints of integer
    centroids), with the lower one's score as the floor, are settled in float64 and take the lower index, as
    kmeans_assign does."""
    generator = torch.Generator().manual_seed(12)
    centroids = torch.randn(8, 10, generator=generator).mul(10).round()
    centroids[1::2] = centroids[0::2] + torch.eye(10)[:4] * 2  # pairs 2 apart, far from the other pairs
    noisy = centroids + torch.randn(8, 10, generator=generator)
    x = torch.cat([(centroids[0::2] + centroids[1::2]) / 2, noisy])
    state = Pass(x, 8)
    state(centroids)
    state.basis_labels.copy_(state.labels)  # the same centroids again: a pass that moves nothing
    ties = torch.arange(4)
    higher = 2 * ties + 1
    chosen = centroids[higher].double()
    score = (chosen ** 2).sum(1) - 2 * (chosen * x[ties].double()).sum(1)
    state.tops[:TOP_SLOTS, ties] = float("inf")
    state.tops[TOP_SLOTS:2 * TOP_SLOTS, ties] = -1.0
    state.tops[0, ties] = score.float()  # exact: integer and half-integer coordinates
    state.tops[TOP_SLOTS, ties] = higher.float()
    state.tops[-1, ties] = score.float()  # the lower centroid's score, the same: the floor
    assert_top_lists_hold(state, centroids)
    distances, counts = state(centroids, dense_changes=0.0)
    assert counts.tolist()[1:] == [0, 0]
    assert_kmeans_assign_labels(state, centroids, distances)
    assert torch.equal(state.labels[ties], 2 * ties)
