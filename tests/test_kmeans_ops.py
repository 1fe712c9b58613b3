"""kmeans_assign / kmeans_update: kernels against float64 references, tie rules, determinism, opcheck, bad input."""

from __future__ import annotations

import pytest
import torch

from pydc.ops import kmeans_assign, kmeans_assign_reference, kmeans_update, kmeans_update_reference
from tests.conftest import cpu_and_cuda

ASSIGN = torch.ops.pydc.kmeans_assign
UPDATE = torch.ops.pydc.kmeans_update

# (N, k, d): degenerate sizes, sizes off the CPU blocks (fused: 6-row tiles, 96-row chunks, 32-centroid
# panels, 256-centroid blocks; BLAS: 8192 points x 1024 centroids) and off warp widths.
ASSIGN_SIZES = [(1, 1, 1), (5, 1, 3), (7, 3, 2), (33, 17, 5), (97, 33, 7), (300, 257, 32), (1000, 1100, 16),
                (9000, 40, 8)]


@pytest.fixture(params=["default", "fused"])
def cpu_kernel(request, monkeypatch):
    """Runs a test with the default CPU assignment (BLAS blocks) and with the fused AVX-512 kernel (the BLAS
    path again on CPUs without AVX-512)."""
    if request.param == "fused":
        if request.node.callspec.params.get("device") == "cuda":
            pytest.skip("the fused switch is a CPU path")
        monkeypatch.setenv("PYDC_KMEANS_FUSED", "1")
    return request.param


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
    assert torch.equal(labels, ASSIGN(x, centroids, None, True)[0])
    sums, counts = kmeans_update(x, labels, 7)
    assert torch.equal(counts, torch.bincount(labels, minlength=7))
