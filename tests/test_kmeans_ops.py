"""kmeans_assign / kmeans_update: kernels against float64 references, tie rules, determinism, opcheck, bad input."""

from __future__ import annotations

import pytest
import torch

from pydc import _C
from pydc.ops import cpu_gemm, kmeans_assign, kmeans_assign_reference, kmeans_update, kmeans_update_reference
from tests.conftest import cpu_and_cuda

ASSIGN = torch.ops.pydc.kmeans_assign
UPDATE = torch.ops.pydc.kmeans_update

# (N, k, d): degenerate sizes, sizes off the CPU blocks (fused: 6-row tiles, 96-row chunks, 32-centroid
# panels, 256-centroid blocks; BLAS: 8192 points x 1024 centroids) and off warp widths.
ASSIGN_SIZES = [(1, 1, 1), (5, 1, 3), (7, 3, 2), (33, 17, 5), (97, 33, 7), (300, 257, 32), (1000, 1100, 16),
                (9000, 40, 8)]


@pytest.fixture(params=["torch-blas", "scipy-blas"])
def cpu_kernel(request):
    """Runs a test with each BLAS the CPU assignment can use for its GEMM blocks (pydc.ops.cpu_gemm), forced,
    and restores the process's choice afterwards."""
    blas = request.param.removesuffix("-blas")
    if blas == "scipy" and request.node.callspec.params.get("device") == "cuda":
        pytest.skip("the BLAS choice is a CPU path")
    previous = _C.cpu_gemm()
    cpu_gemm.use_cpu_gemm(blas)
    yield request.param
    cpu_gemm.use_cpu_gemm(previous)


def random_points(n: int, d: int, device, generator=None) -> torch.Tensor:
    return torch.randn((n, d), dtype=torch.float64, generator=generator).to(device=device, dtype=torch.float32)


def check_nearest(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, distances: torch.Tensor):
    """labels are nearest centroids up to float32 rounding, and distances are their squared distances."""
    x64, c64 = x.double().cpu(), centroids.double().cpu()
    exact = torch.cdist(x64, c64).pow(2)
    best = exact.min(dim=1).values
    chosen = exact.gather(1, labels.cpu().unsqueeze(1)).squeeze(1)
    scale = x64.pow(2).sum(1) + c64.pow(2).sum(1).max()
    # float32 dot products are off by ~d * 2^-24 * scale; a chosen centroid farther than that is a wrong pick
    tolerance = 1e-5 * scale + 1e-6
    assert bool((chosen - best <= tolerance).all()), f"max excess {(chosen - best).max().item()}"
    torch.testing.assert_close(distances.double().cpu(), chosen, rtol=0, atol=float(tolerance.max()))
    return exact


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("size", ASSIGN_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_assign_matches_float64(device, size, cpu_kernel):
    n, k, d = size
    x = random_points(n, d, device)
    centroids = random_points(k, d, device)
    labels, distances = ASSIGN(x, centroids, None, True)
    assert labels.dtype == torch.int64 and distances.dtype == torch.float32
    assert labels.shape == (n,) and distances.shape == (n,) and labels.device == x.device
    exact = check_nearest(x, centroids, labels, distances)
    # On random data near-ties are rare: the labels equal the float64 arg-min wherever the gap is clear.
    top2 = exact.topk(min(2, k), dim=1, largest=False).values
    clear = (top2[:, -1] - top2[:, 0] > 1e-3) if k > 1 else torch.ones(n, dtype=torch.bool)
    assert torch.equal(labels.cpu()[clear], exact.argmin(1)[clear])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_assign_equals_reference_on_separated_data(device, cpu_kernel):
    generator = torch.Generator().manual_seed(1)
    centroids = random_points(50, 16, device, generator) * 10
    members = torch.randint(0, 50, (2000,), generator=generator).to(device)
    x = centroids[members] + 0.01 * random_points(2000, 16, device, generator)
    labels, distances = ASSIGN(x, centroids, None, True)
    ref_labels, ref_distances = kmeans_assign_reference(x, centroids, compute_dtype=torch.float64)
    assert torch.equal(labels, members) and torch.equal(labels, ref_labels)
    # ||x||^2 ~ 1600 while the distances are ~0.002: the expansion's float32 cancellation is ~1e-4 * 16
    torch.testing.assert_close(distances, ref_distances, rtol=0, atol=5e-3)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_assign_ties_go_to_lowest_index(device, cpu_kernel):
    base = random_points(5, 8, device)
    centroids = torch.cat([base[2:3], base, base[2:3]])  # centroid 0, 3 and 6 are equal
    x = base[2:3].repeat(4, 1)
    labels, distances = ASSIGN(x, centroids, None, True)
    assert labels.tolist() == [0, 0, 0, 0]
    assert (distances >= 0).all() and distances.max().item() < 1e-4
    identical = base[:1].repeat(3, 1)  # all centroids equal: every point takes centroid 0
    labels, _ = ASSIGN(random_points(20, 8, device), identical, None, True)
    assert labels.eq(0).all()


def integer_points(n: int, d: int, low: int, high: int, generator, device) -> torch.Tensor:
    """Points with small integer coordinates: every dot product, norm and score is exact in float32, whatever
    the summation order, so equal distances are exact ties in every kernel."""
    return torch.randint(low, high, (n, d), generator=generator).to(device=device, dtype=torch.float32)


def lowest_nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (float64) squared distances: the lowest index among the nearest centroids, and its distance."""
    exact = (x.double().cpu().unsqueeze(1) - centroids.double().cpu().unsqueeze(0)).pow(2).sum(2)
    best = exact.min(dim=1, keepdim=True).values
    return exact.eq(best).int().argmax(dim=1), best.squeeze(1)  # argmax: the first True


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_assign_ties_in_every_lane_and_the_tail(device, cpu_kernel):
    # The CPU arg-min scans 16 centroids at a time (lane l sees centroids l, l + 16, ...) and ends with a tail
    # of k % 16; the fused kernel's panels hold 32. k = 16 * 5 + 7: for every lane l, point l equals
    # centroids l and l + 48 (same lane, three groups later) and no other, so lane l itself must keep the
    # first of two equal scores. Two more points: copies at 20 (lane part) and 83 (tail), and at 81 and 86
    # (both in the tail).
    generator = torch.Generator().manual_seed(5)
    k, d = 87, 6
    centroids = integer_points(k, d, -20, 21, generator, device)
    assert centroids.unique(dim=0).shape[0] == k
    pairs = [(lane, lane + 48) for lane in range(16)] + [(20, 83), (81, 86)]
    for first, second in pairs:
        centroids[second] = centroids[first]
    x = torch.stack([centroids[first] for first, _ in pairs])
    labels, distances = ASSIGN(x, centroids, None, True)
    assert labels.tolist() == [first for first, _ in pairs]
    assert distances.eq(0).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("k", [64, 100, 1100])  # 1100: over the BLAS path's 1024-centroid blocks
def test_assign_exact_ties_go_to_lowest_index(device, k, cpu_kernel):
    # Centroids drawn from a pool of 12 integer vectors, so every vector appears at many positions (every
    # lane, the tail, both centroid blocks); points on a small integer grid are also often equidistant
    # from different vectors. All arithmetic is exact: labels and distances must equal the exact answer.
    generator = torch.Generator().manual_seed(k)
    pool = integer_points(12, 5, -3, 4, generator, "cpu")
    centroids = pool[torch.randint(0, 12, (k,), generator=generator)].to(device)
    x = integer_points(600, 5, -3, 4, generator, device)
    labels, distances = ASSIGN(x, centroids, None, True)
    expected_labels, expected_distances = lowest_nearest(x, centroids)
    assert torch.equal(labels.cpu(), expected_labels)
    assert torch.equal(distances.cpu(), expected_distances.float())


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_assign_given_norms_and_strided_inputs(device, cpu_kernel):
    x = random_points(500, 24, device)
    centroids = random_points(30, 24, device)
    labels, distances = ASSIGN(x, centroids, None, True)
    norms = (x.double() ** 2).sum(1).float()
    labels_n, distances_n = ASSIGN(x, centroids, norms, True)
    assert torch.equal(labels, labels_n)
    torch.testing.assert_close(distances, distances_n, rtol=1e-5, atol=1e-4)
    wide = torch.repeat_interleave(x, 2, dim=1)[:, ::2]  # non-contiguous view, same values
    labels_s, distances_s = ASSIGN(wide, centroids.t().contiguous().t(), None, True)
    assert torch.equal(labels, labels_s) and torch.equal(distances, distances_s)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_assign_empty_input(device):
    labels, distances = ASSIGN(torch.empty((0, 4), device=device), random_points(3, 4, device), None, True)
    assert labels.shape == (0,) and distances.shape == (0,)


@pytest.mark.cuda
@pytest.mark.parametrize("allow_tf32", [True, False])
def test_cuda_assign_equals_cpu(allow_tf32):
    # Unit-norm points and centroids like DeepCluster's whitened features; TF32 only ranks candidates, the
    # fp32 re-scoring picks the same labels as the CPU.
    x = torch.nn.functional.normalize(random_points(8000, 64, "cpu"), dim=1)
    centroids = torch.nn.functional.normalize(random_points(2000, 64, "cpu"), dim=1)
    labels, distances = ASSIGN(x, centroids, None, True)
    labels_gpu, distances_gpu = ASSIGN(x.cuda(), centroids.cuda(), None, allow_tf32)
    check_nearest(x, centroids, labels_gpu, distances_gpu)
    agree = (labels_gpu.cpu() == labels).float().mean().item()
    assert agree > 0.999, agree
    torch.testing.assert_close(distances_gpu.cpu(), distances, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_assign_over_many_chunks_and_centroid_blocks(monkeypatch):
    # A 3000-float workspace and 70-centroid blocks: 300 centroids in 5 blocks (the candidates carry over
    # between blocks), 4000 points in chunks of 42 rows (3000 // 70).
    x = random_points(4000, 24, "cuda")
    centroids = random_points(300, 24, "cuda")
    labels, distances = ASSIGN(x, centroids, None, True)
    monkeypatch.setenv("PYDC_KMEANS_CUDA_BLOCK_COLS", "70")
    monkeypatch.setenv("PYDC_KMEANS_CUDA_WORKSPACE_FLOATS", "3000")
    small_labels, small_distances = ASSIGN(x, centroids, None, True)
    check_nearest(x, centroids, small_labels, small_distances)
    assert (small_labels == labels).float().mean().item() > 0.999
    torch.testing.assert_close(small_distances, distances, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("size", [(1, 1, 1), (10, 3, 5), (1000, 17, 33), (5000, 300, 8)], ids=str)
def test_update_matches_reference(device, size):
    n, k, d = size
    x = random_points(n, d, device)
    labels = torch.randint(0, k, (n,)).to(device)
    sums, counts = UPDATE(x, labels, k, True)
    ref_sums, ref_counts = kmeans_update_reference(x, labels, k)
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-6, atol=1e-5)
    if device == "cuda":
        fast_sums, fast_counts = UPDATE(x, labels, k, False)
        assert torch.equal(fast_counts, ref_counts)
        torch.testing.assert_close(fast_sums, ref_sums, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_update_accumulates_in_float64(device):
    # Values 4096 + m / 1024 are exact in float32, and so is every partial sum in float64 (< 2^27, multiples
    # of 2^-10), so the float64 reference is the exact sum and the kernel must return it correctly rounded:
    # bitwise equal. A float32 accumulator rounds each of the ~20000 adds per cluster to a multiple of 8 (the
    # float32 step near 8e7) and ends hundreds of units away.
    generator = torch.Generator().manual_seed(3)
    n, d, k = 60000, 8, 3
    fractions = torch.randint(0, 4096, (n, d), generator=generator) / 1024.0
    x = (4096.0 + fractions).to(device=device, dtype=torch.float32)
    labels = torch.randint(0, k, (n,), generator=generator).to(device)
    sums, counts = UPDATE(x, labels, k, True)
    ref_sums, ref_counts = kmeans_update_reference(x, labels, k)
    assert torch.equal(counts, ref_counts)
    assert torch.equal(sums, ref_sums), f"max error {(sums.double() - ref_sums.double()).abs().max().item()}"


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_update_empty_clusters_are_zero(device):
    x = random_points(40, 6, device)
    labels = torch.tensor([1, 4] * 20, device=device)
    sums, counts = UPDATE(x, labels, 6, True)
    assert counts.tolist() == [0, 20, 0, 0, 20, 0]
    assert sums[[0, 2, 3, 5]].eq(0).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_update_deterministic_is_bitwise_reproducible(device):
    x = random_points(20000, 64, device) * 100
    labels = torch.randint(0, 37, (20000,)).to(device)
    first = UPDATE(x, labels, 37, True)
    for _ in range(3):
        again = UPDATE(x, labels, 37, True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    if device == "cpu":  # the CPU result does not depend on the thread count either
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = UPDATE(x, labels, 37, True)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(first[0], single[0])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_update_of_flagged_clusters_only(device):
    """clusters: the flagged clusters' sums as the full update's, bit for bit; the others' 0; every count."""
    generator = torch.Generator().manual_seed(11)
    x = random_points(3000, 19, device, generator) * 10
    labels = torch.randint(0, 23, (3000,), generator=generator).to(device)
    clusters = (torch.arange(23) % 3 == 1).to(device)
    clusters[22] = True  # and an empty one
    labels[labels == 22] = 0
    full_sums, full_counts = UPDATE(x, labels, 23, True)
    sums, counts = UPDATE(x, labels, 23, True, clusters)
    assert torch.equal(counts, full_counts)
    assert torch.equal(sums[clusters], full_sums[clusters])
    assert bool((sums[~clusters] == 0).all())
    ref_sums, ref_counts = kmeans_update_reference(x, labels, 23, clusters)
    assert torch.equal(ref_counts, counts) and bool((ref_sums[~clusters] == 0).all())
    torch.testing.assert_close(sums, ref_sums, rtol=1e-6, atol=1e-5)
    assert torch.equal(kmeans_update(x, labels, 23, True, clusters)[0], sums)


def test_update_rejects_bad_cluster_flags():
    x = random_points(6, 2, "cpu")
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    for bad in (torch.ones(3, dtype=torch.int64), torch.ones(4, dtype=torch.bool),
                torch.ones(1, 3, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"expected clusters to be a bool tensor of shape \(3,\)"):
            kmeans_update(x, labels, 3, True, bad)
    with pytest.raises(RuntimeError, match="clusters"):
        UPDATE(x, labels, 3, True, torch.ones(4, dtype=torch.bool))


def test_update_cpu_rejects_out_of_range_labels():
    x = random_points(4, 2, "cpu")
    with pytest.raises(RuntimeError, match=r"labels in \[0, k\)"):
        UPDATE(x, torch.tensor([0, 1, 3, 1]), 3, True)
    with pytest.raises(RuntimeError, match=r"labels\[0\] = -1"):
        UPDATE(x, torch.tensor([-1, 1, 0, 1]), 3, True)


@pytest.mark.cuda
def test_cuda_update_skips_out_of_range_labels():
    x = random_points(4, 2, "cuda")
    for deterministic in (True, False):
        sums, counts = UPDATE(x, torch.tensor([0, 5, -1, 1], device="cuda"), 3, deterministic)
        assert counts.tolist() == [1, 1, 0]
        torch.testing.assert_close(sums[:2], x[[0, 3]])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(device):
    x = random_points(70, 9, device)
    centroids = random_points(6, 9, device)
    torch.library.opcheck(ASSIGN, (x, centroids, None, True))
    torch.library.opcheck(ASSIGN, (x, centroids, (x * x).sum(1), False))
    labels = torch.randint(0, 6, (70,)).to(device)
    torch.library.opcheck(UPDATE, (x, labels, 6, True))
    torch.library.opcheck(UPDATE, (x, labels, 6, False))


def test_ops_inside_compiled_function():
    torch._dynamo.reset()

    def step(x, centroids):
        labels, _ = ASSIGN(x, centroids, None, True)
        sums, counts = UPDATE(x, labels, centroids.shape[0], True)
        return sums / counts.clamp_min(1).unsqueeze(1)

    x, centroids = random_points(200, 4, "cpu"), random_points(5, 4, "cpu")
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(x, centroids), step(x, centroids))


BAD_ASSIGN = [
    (lambda: (torch.zeros(4), torch.zeros(2, 1)), "2-D"),
    (lambda: (torch.zeros(4, 3, dtype=torch.float64), torch.zeros(2, 3)), "x of dtype (torch.float32|Float)"),
    (lambda: (torch.zeros(4, 3), torch.zeros(2, 3, dtype=torch.float16)), "centroids of dtype (torch.float32|Float)"),
    (lambda: (torch.zeros(4, 3), torch.zeros(2, 5)), r"centroids of shape \(k, 3\)"),
    (lambda: (torch.zeros(4, 3), torch.zeros(0, 3)), "at least one centroid"),
    (lambda: (torch.zeros(4, 0), torch.zeros(2, 0)), "at least one feature"),
]


@pytest.mark.parametrize("make,message", BAD_ASSIGN)
def test_bad_assign_input(make, message):
    x, centroids = make()
    with pytest.raises(RuntimeError, match=message):
        ASSIGN(x, centroids, None, True)
    with pytest.raises(ValueError, match=message):
        kmeans_assign(x, centroids)


def test_bad_norms_and_update_input():
    x = torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="x_sq_norms of shape"):
        ASSIGN(x, torch.zeros(2, 3), torch.zeros(5), True)
    with pytest.raises(ValueError, match="x_sq_norms"):
        kmeans_assign(x, torch.zeros(2, 3), torch.zeros(5))
    with pytest.raises(RuntimeError, match="one label per row"):
        UPDATE(x, torch.zeros(3, dtype=torch.int64), 2, True)
    with pytest.raises(ValueError, match="one label per row"):
        kmeans_update(x, torch.zeros(3, dtype=torch.int64), 2)
    with pytest.raises(RuntimeError, match="Long|int64"):
        UPDATE(x, torch.zeros(4, dtype=torch.int32), 2, True)
    with pytest.raises(RuntimeError, match="k >= 1"):
        UPDATE(x, torch.zeros(4, dtype=torch.int64), 0, True)
    with pytest.raises(ValueError, match="k >= 1"):
        kmeans_update(x, torch.zeros(4, dtype=torch.int64), 0)


def test_wrappers_match_ops():
    x, centroids = random_points(100, 5, "cpu"), random_points(7, 5, "cpu")
    labels, distances = kmeans_assign(x, centroids)
    op_labels, op_distances = ASSIGN(x, centroids, None, True)
    assert torch.equal(labels, op_labels) and torch.equal(distances, op_distances)
    sums, counts = kmeans_update(x, labels, 7)
    assert torch.equal(counts, torch.bincount(labels, minlength=7))
    op_sums, _ = UPDATE(x, labels, 7, True)
    assert torch.equal(sums, op_sums)
    torch.testing.assert_close(sums, kmeans_update_reference(x, labels, 7)[0], rtol=1e-6, atol=1e-6)
