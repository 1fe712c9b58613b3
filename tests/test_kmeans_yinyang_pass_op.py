"""pydc::kmeans_yinyang_pass, the bounded (Yinyang) pass that CPU and CUDA run from one source
(csrc/common/kmeans_yinyang_pass.h): a refresh gives kmeans_assign's exact labels and valid bounds, a filtered
pass gives the labels for the moved centroids while scoring fewer pairs, bad input is refused or (labels out
of range) scored in full, and the CUDA kernel (cuda marker) gives the CPU's labels bit for bit.

Whole k-means runs with these passes (PYDC_KMEANS_BOUNDS=portable) equal plain Lloyd in
tests/test_kmeans_bounded.py."""

from __future__ import annotations

import pytest
import torch

from pydc.cluster.kmeans import initial_centroids
from pydc.ops._registry import HAS_OPS
from tests.test_kmeans_yinyang_op import OFFSETS, assert_bounds_hold, clustered, group_drift

pytestmark = pytest.mark.skipif(not HAS_OPS, reason="needs the compiled pydc ops")

K = 30
ORDER = torch.randperm(K, generator=torch.Generator().manual_seed(3))


def run_pass(x, centroids, drift, refresh, labels, lower, order=ORDER, offsets=OFFSETS):
    norms = (x * x).sum(1)
    if drift is None:
        drift = torch.zeros(offsets.numel() - 1, dtype=torch.float64, device=x.device)
    return torch.ops.pydc.kmeans_yinyang_pass(x, centroids[order], order, offsets, norms, drift, refresh,
                                             labels, lower)


def fresh_state(n, groups=OFFSETS.numel() - 1, device="cpu"):
    return (torch.full((n,), -7, dtype=torch.int64, device=device),
            torch.full((n, groups), float("nan"), dtype=torch.float64, device=device))


def assert_upper_holds(x, centroids, labels, upper):
    exact = (x.double() - centroids.double()[labels]).norm(dim=1)
    assert bool((upper >= exact).all())


def test_refresh_gives_exact_labels_and_valid_bounds():
    x = clustered(n=1201, d=20, centres=K, seed=9)
    centroids = initial_centroids(x, K, seed=1)
    labels, lower = fresh_state(x.shape[0])
    distances, upper, counts = run_pass(x, centroids, None, True, labels, lower)
    plain_labels, plain_distances = torch.ops.pydc.kmeans_assign(x, centroids, None, True)
    assert torch.equal(labels, plain_labels)
    torch.testing.assert_close(distances, plain_distances.double(), rtol=1e-5, atol=1e-4)
    assert counts.tolist() == [x.shape[0], x.shape[0] * K]
    assert_bounds_hold(x, centroids, ORDER, OFFSETS, labels, lower)
    assert_upper_holds(x, centroids, labels, upper)


def test_filtered_passes_give_the_new_labels_and_skip_work():
    x = clustered(n=2503, d=20, centres=K, seed=9)
    old = initial_centroids(x, K, seed=1)
    labels, lower = fresh_state(x.shape[0])
    run_pass(x, old, None, True, labels, lower)
    generator = torch.Generator().manual_seed(4)
    for step in range(3):  # successive passes keep bounds valid through decay and refresh
        new = old + 0.05 * torch.randn(old.shape, generator=generator)
        new[step * 7] += 2.0  # one centroid jumps: its group's bound decays to nothing
        previous = labels.clone()
        drift = group_drift(old, new, ORDER, OFFSETS)
        distances, upper, counts = run_pass(x, new, drift, False, labels, lower)
        plain_labels, _ = torch.ops.pydc.kmeans_assign(x, new, None, True)
        assert torch.equal(labels, plain_labels)
        assert_bounds_hold(x, new, ORDER, OFFSETS, labels, lower)
        assert_upper_holds(x, new, labels, upper)
        rows, scores = counts.tolist()
        assert 0 < rows < x.shape[0] and scores < rows * K  # the global and the local filter both skipped
        assert bool((labels != previous).any())
        old = new


def test_points_the_bounds_settle_keep_their_label_and_the_cpu_float64_distance():
    """With bounds that settle every point, nothing is scored: labels stay, and the distances are the
    fixed-order float64 ones of the CPU kernels (kmeans_label_distances), bit for bit."""
    x = clustered(n=700, d=21, centres=K, seed=5)  # d = 21: the 8-lane order's ragged tail
    centroids = initial_centroids(x, K, seed=2)
    labels = torch.randint(0, K, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    lower = torch.full((x.shape[0], OFFSETS.numel() - 1), float("inf"), dtype=torch.float64)
    distances, upper, counts = run_pass(x, centroids, None, False, labels.clone(), lower)
    assert counts.tolist() == [0, 0]
    assert torch.equal(distances, torch.ops.pydc.kmeans_label_distances(x, centroids, labels))
    assert bool((upper >= distances.sqrt()).all())


def test_separation_alone_skips_the_groups_of_far_centroids():
    """With every group bound at 0 only the centroids' separation can settle a group: on separated clusters it
    settles most of them, and the labels stay exact and the bounds it leaves valid."""
    generator = torch.Generator().manual_seed(21)
    means = torch.randn(K, 16, generator=generator) * 3
    x = means[torch.randint(0, K, (1500,), generator=generator)] + torch.randn(1500, 16, generator=generator)
    labels, lower = fresh_state(x.shape[0])
    run_pass(x, means, None, True, labels, lower)
    lower.zero_()
    no_drift = torch.zeros(OFFSETS.numel() - 1, dtype=torch.float64)
    _, _, counts = run_pass(x, means, no_drift, False, labels, lower)
    plain_labels, _ = torch.ops.pydc.kmeans_assign(x, means, None, True)
    assert torch.equal(labels, plain_labels)
    assert_bounds_hold(x, means, ORDER, OFFSETS, labels, lower)
    rows, scores = counts.tolist()
    assert 0 < rows < 0.5 * x.shape[0] and scores < 0.5 * x.shape[0] * K  # most points settled with no score


def test_filtered_pass_equals_the_cpu_yinyang_kernel():
    """The same state through kmeans_assign_yinyang (blocked scores, separation filter) and this pass: the
    same labels, both bounds valid."""
    x = clustered(n=1500, d=16, centres=K, seed=12)
    old = initial_centroids(x, K, seed=2)
    norms = (x * x).sum(1)
    labels, _, _, lower = torch.ops.pydc.kmeans_assign_bounds(x, old[ORDER], ORDER, OFFSETS, norms)
    new = old + 0.1 * torch.randn(old.shape, generator=torch.Generator().manual_seed(5))
    drift = group_drift(old, new, ORDER, OFFSETS)
    labels_pass, lower_pass = labels.clone(), lower.clone()
    torch.ops.pydc.kmeans_assign_yinyang(x, new[ORDER], ORDER, OFFSETS, norms, drift, labels, lower)
    run_pass(x, new, drift, False, labels_pass, lower_pass)
    assert torch.equal(labels_pass, labels)
    assert_bounds_hold(x, new, ORDER, OFFSETS, labels_pass, lower_pass)


def test_near_ties_settle_to_the_lowest_index():
    """Points exactly between two centroids, and duplicate centroids: ties go to the lowest original index,
    in a refresh and in a filtered pass (kmeans_assign_bounds' and kmeans_assign's labels)."""
    generator = torch.Generator().manual_seed(8)
    centroids = torch.randn(K, 8, generator=generator).round()  # small integers: midpoints are exact
    centroids[5] = centroids[17]
    centroids[ORDER[0]] = centroids[ORDER[-1]]  # duplicates in different groups
    midpoints = (centroids[torch.arange(0, K, 2)] + centroids[torch.arange(1, K, 2)]) / 2
    x = torch.cat([midpoints.repeat(5, 1), centroids.repeat(3, 1), torch.randn(300, 8, generator=generator)])
    exact = torch.cdist(x.double(), centroids.double()).pow(2)
    first_min = (exact == exact.min(1, keepdim=True).values).int().argmax(1)
    labels, lower = fresh_state(x.shape[0])
    run_pass(x, centroids, None, True, labels, lower)
    assert torch.equal(labels, first_min)
    drift = torch.zeros(OFFSETS.numel() - 1, dtype=torch.float64)
    labels[::3] = (labels[::3] + 1) % K  # stale labels: their points must be re-decided
    lower[::3] = 0.0
    run_pass(x, centroids, drift, False, labels, lower)
    assert torch.equal(labels, first_min)


def test_labels_out_of_range_are_scored_in_full():
    x = clustered(n=400, d=12, centres=K, seed=3)
    centroids = initial_centroids(x, K, seed=4)
    labels, lower = fresh_state(x.shape[0])
    run_pass(x, centroids, None, True, labels, lower)
    expected = labels.clone()
    labels[:5] = torch.tensor([-1, K, K + 100, -(2 ** 40), 2 ** 40])
    no_drift = torch.zeros(OFFSETS.numel() - 1, dtype=torch.float64)
    _, _, counts = run_pass(x, centroids, no_drift, False, labels, lower)
    assert torch.equal(labels, expected)
    assert counts[0] >= 5


def test_nan_points_get_label_zero_and_zero_bounds():
    x = clustered(n=64, d=8, centres=K, seed=6)
    x[3] = float("nan")
    centroids = initial_centroids(x[4:], K, seed=1)
    labels, lower = fresh_state(x.shape[0])
    run_pass(x, centroids, None, True, labels, lower)
    assert labels[3] == 0 and bool((lower[3] == 0).all())
    plain_labels, _ = torch.ops.pydc.kmeans_assign(x, centroids, None, True)
    assert torch.equal(labels, plain_labels)


def test_bad_inputs_name_what_was_expected():
    x = clustered(n=50, d=8, centres=K, seed=1)
    centroids = initial_centroids(x, K, seed=1)
    labels, lower = fresh_state(50)
    norms = (x * x).sum(1)
    drift = torch.zeros(OFFSETS.numel() - 1, dtype=torch.float64)
    op = torch.ops.pydc.kmeans_yinyang_pass
    cases = [
        ((x.double(), centroids, ORDER, OFFSETS, norms, drift, True, labels, lower), "x of dtype Float"),
        ((x, centroids[:, :4], ORDER, OFFSETS, norms, drift, True, labels, lower), "same d"),
        ((x, centroids, ORDER[:-1], OFFSETS, norms, drift, True, labels, lower), "centroid_ids of shape"),
        ((x, centroids, ORDER * 0, OFFSETS, norms, drift, True, labels, lower), "permutation"),
        ((x, centroids, ORDER, OFFSETS.flip(0), norms, drift, True, labels, lower), "from 0 to k"),
        ((x, centroids, ORDER, torch.arange(66), norms, drift, True, labels, lower), "1 to 64 groups"),
        ((x, centroids, ORDER, OFFSETS, norms, drift[:2], True, labels, lower), "group_drift of shape"),
        ((x, centroids, ORDER, OFFSETS, norms, drift, True, labels[:10], lower), "labels of shape"),
        ((x, centroids, ORDER, OFFSETS, norms, drift, True, labels, lower.float()), "group_lower of dtype"),
        ((x, centroids, ORDER, OFFSETS, norms, drift, True, labels, lower.t()), "contiguous group_lower"),
    ]
    for args, message in cases:
        before = (labels.clone(), lower.clone())
        with pytest.raises(RuntimeError, match=message):
            op(*args)
        assert torch.equal(labels, before[0]) and torch.equal(lower.nan_to_num(), before[1].nan_to_num())


def test_fake_matches_the_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = clustered(n=40, d=8, centres=K, seed=1)
    centroids = initial_centroids(x, K, seed=1)
    labels, lower = fresh_state(40)
    real = run_pass(x, centroids, None, True, labels, lower)
    with FakeTensorMode() as mode:
        fx, fc = mode.from_tensor(x), mode.from_tensor(centroids)
        fl, flow = mode.from_tensor(labels), mode.from_tensor(lower)
        fake = run_pass(fx, fc, None, True, fl, flow, order=mode.from_tensor(ORDER),
                        offsets=mode.from_tensor(OFFSETS))
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype


@pytest.mark.cuda
@pytest.mark.parametrize("d", [20, 256])
def test_cuda_pass_gives_the_cpu_labels(d):
    """The warp-per-point kernel against the CPU's thread-per-point one (same code): identical labels in a
    refresh and in filtered passes, float64 distances of kept points identical, bounds valid."""
    x = clustered(n=3001, d=d, centres=K, seed=9)
    old = initial_centroids(x, K, seed=1)
    state = {device: fresh_state(x.shape[0], device=device) for device in ("cpu", "cuda")}
    for device, (labels, lower) in state.items():
        order, offsets = ORDER.to(device), OFFSETS.to(device)
        run_pass(x.to(device), old.to(device), None, True, labels, lower, order, offsets)
    assert torch.equal(state["cuda"][0].cpu(), state["cpu"][0])
    generator = torch.Generator().manual_seed(4)
    for step in range(3):
        new = old + 0.05 * torch.randn(old.shape, generator=generator)
        new[step * 7] += 2.0
        drift = group_drift(old, new, ORDER, OFFSETS)
        out = {}
        for device, (labels, lower) in state.items():
            out[device] = run_pass(x.to(device), new.to(device), drift.to(device), False, labels, lower,
                                   ORDER.to(device), OFFSETS.to(device))
        torch.cuda.synchronize()
        assert torch.equal(state["cuda"][0].cpu(), state["cpu"][0])
        assert_bounds_hold(x, new, ORDER, OFFSETS, state["cuda"][0].cpu(), state["cuda"][1].cpu())
        cpu_rows, cuda_rows = out["cpu"][2].tolist()[0], out["cuda"][2].tolist()[0]
        assert cpu_rows < x.shape[0] and cuda_rows < x.shape[0]
        # a point kept on both devices has the same fixed-order float64 distance, bit for bit
        same = int((out["cuda"][0].cpu() == out["cpu"][0]).sum())
        assert same >= x.shape[0] - cpu_rows - cuda_rows
        torch.testing.assert_close(out["cuda"][0].cpu(), out["cpu"][0], rtol=1e-5, atol=1e-4)
        old = new


@pytest.mark.cuda
def test_cuda_bounded_run_has_exact_labels(monkeypatch):
    """kmeans on CUDA with PYDC_KMEANS_BOUNDS=yinyang runs these passes; its final labels are the exact labels
    of its final centroids and its objective that of the CPU's plain Lloyd from the same start."""
    from pydc.cluster import kmeans

    monkeypatch.setenv("PYDC_KMEANS_BOUNDS", "yinyang")
    x = clustered(n=20000, d=64, centres=100, seed=2)
    init = initial_centroids(x, 100, seed=3)
    result = kmeans(x.cuda(), 100, niter=15, backend="torch", init_centroids=init.cuda())
    assert result.bounded and result.bounds == "portable"
    exact, _ = torch.ops.pydc.kmeans_assign(x, result.centroids.cpu(), None, True)
    assert torch.equal(result.labels.cpu(), exact)
    plain = kmeans(x, 100, niter=15, backend="torch", init_centroids=init, bounded=False)
    # the updates' float64 sums run in another order on CUDA: compare the end, not iteration by iteration
    assert result.objective[-1] == pytest.approx(plain.objective[-1], rel=1e-4)
    # the CPU's run of these passes (PYDC_KMEANS_BOUNDS=portable) computes 21% of the scores
    assert sum(result.scores_computed) < 0.5 * len(result.scores_computed) * x.shape[0] * 100


@pytest.mark.parametrize("requested", ["auto", "yinyang", "portable", "elkan"])
def test_cuda_runs_bounded_only_when_asked(requested, monkeypatch):
    """CUDA tensors get bounded k-means (this op) only with PYDC_KMEANS_BOUNDS=yinyang or portable, and only
    where the build registered the CUDA kernel (a CUDA build does, with or without a GPU)."""
    import types

    from pydc import extension
    from pydc.cluster import kmeans_bounded

    monkeypatch.setenv("PYDC_KMEANS_BOUNDS", requested)
    registered = torch._C._dispatch_has_kernel_for_dispatch_key("pydc::kmeans_yinyang_pass", "CUDA")
    assert registered == extension.build_info()["with_cuda"]
    on_cuda = types.SimpleNamespace(device=torch.device("cuda", 0))
    assert kmeans_bounded.bounded_assignment_available(on_cuda) == (registered and requested in ("yinyang",
                                                                                                 "portable"))
    assert kmeans_bounded.choose_bounds(1000, 10, device="cuda") == "portable"
    assert kmeans_bounded.choose_bounds(1000, 10) == ("portable" if requested == "portable" else requested)
