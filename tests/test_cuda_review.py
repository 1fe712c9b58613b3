"""CUDA cases of the kernel review (issue 13): one small case per kernel path, each checked against the CPU
kernel that shares its math. benchmarks/gpu_check.py runs exactly these names under compute-sanitizer
(SANITIZE_CASES, RACECHECK_CASES), so they stay small: each one launches every kernel of its path once or
a few times. Skipped without a GPU; their CPU twins are in test_cuda_review_cpu.py."""

from __future__ import annotations

import pytest
import torch

import pydc  # noqa: F401  (registers torch.ops.pydc)
from pydc.ops import kmeans_assign, kmeans_update, odc, sobel_normalize
from pydc.ops.pca import pca_accumulate, pca_accumulate_reference, pca_transform
from tests.conftest import random_images
from tests.test_cuda_review_cpu import float64_labels, near_tie_points
from tests.test_odc_ops import BANK_TOLERANCE, clone_all, make_memory

pytestmark = pytest.mark.cuda
UPDATE = torch.ops.pydc.odc_update_samples


@pytest.fixture
def tf32_on():
    """torch's global TF32 flag on, as a user may have it: fp32 paths must not depend on it."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # the ids benchmarks/gpu_check.py names


def to_cuda(tensors):
    return [t.cuda() for t in tensors]


# --------------------------------------------------------------------------------------------------- Sobel
@pytest.mark.parametrize("case", ["uint8-contiguous", "float16-channels_last", "float32-misaligned",
                                  "float64-contiguous"])
def test_cuda_sobel_paths(case):
    dtype_name, layout = case.split("-")
    dtype = getattr(torch, dtype_name)
    images = random_images((3, 3, 45, 70), dtype, "cpu")  # 70 = 2 full 32-wide tiles + a partial one
    if layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    if layout == "misaligned":  # a storage offset of one element: the scalar (not vector) load path
        images = torch.cat([images.flatten(), images.flatten()[:1]])[1:].view(images.shape)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    expected = sobel_normalize(images, out_dtype=out_dtype)
    got = sobel_normalize(images.cuda(), out_dtype=out_dtype).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cuda_sobel_tall_image_beyond_the_grid_limit():
    """ceil(H / 32) > 65535: the y tiles stride over the grid (a launch error before the fix)."""
    height = 65535 * 32 + 40
    images = torch.randint(0, 256, (1, 3, height, 4), dtype=torch.uint8, device="cuda")
    out = sobel_normalize(images)
    for rows in (slice(0, 8), slice(height - 8, height), slice(65535 * 32 - 4, 65535 * 32 + 4)):
        window = images[:, :, rows].cpu()
        expected = sobel_normalize(window)
        torch.testing.assert_close(out[:, :, rows][:, :, 1:-1].cpu(), expected[:, :, 1:-1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- PCA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=dtype_id)
def test_cuda_pca_accumulate_paths(dtype, tf32_on):
    """Two chunks (16384 rows per chunk), NaN rows, and for float32 the 3xTF32 Gram under the TF32 flag."""
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(17000, 40, generator=generator, dtype=torch.float64) * 3 + 100).to(dtype)
    batch[[5, 16500]] = float("nan")
    shift = batch[:64].double().nan_to_num().mean(0)
    gram_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    state = [torch.zeros(40, dtype=torch.float64), torch.zeros(40, 40, dtype=gram_dtype),
             torch.zeros((), dtype=torch.int64)]
    expected = [state[0].clone(), state[1].double(), state[2].clone()]
    pca_accumulate_reference(batch, shift, *expected)
    got = to_cuda(state)
    pca_accumulate(batch.cuda(), shift.cuda(), *got)
    assert int(got[2]) == 2
    tolerance = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(got[0].cpu(), expected[0], rtol=tolerance, atol=tolerance * 17000)
    upper = got[1].cpu().double().triu()
    error = (upper - expected[1].triu()).abs().max() / expected[1].diagonal().max()
    assert error < tolerance  # float32: TF32 alone would be ~1e-3 here


def test_cuda_pca_transform_nan_rows():
    x = torch.randn(300, 24, generator=torch.Generator().manual_seed(1))
    x[7, 3] = float("inf")
    mean = x.nan_to_num(posinf=0).double().mean(0)
    projection = torch.randn(8, 24, generator=torch.Generator().manual_seed(2))
    out, bad = pca_transform(x.cuda(), mean.cuda(), projection.cuda())
    expected, expected_bad = pca_transform(x, mean, projection)
    assert int(bad) == int(expected_bad) == 1
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------- k-means
@pytest.mark.parametrize("mode", ["tf32", "fp32"])
def test_cuda_kmeans_assign_multichunk(mode, monkeypatch, tf32_on):
    """Near-tie data in workspaces of 1024 dot products (many chunks and centroid blocks): the fp32 path is
    float32-exact although torch's TF32 flag is on; the TF32 path's fp32 re-score mostly recovers."""
    monkeypatch.setenv("PYDC_KMEANS_CUDA_WORKSPACE_FLOATS", "1024")
    monkeypatch.setenv("PYDC_KMEANS_CUDA_BLOCK_COLS", "16")
    x, centroids = near_tie_points()
    expected, clear = float64_labels(x, centroids)
    labels, distances = kmeans_assign(x.cuda(), centroids.cuda(), allow_tf32=mode == "tf32")
    labels = labels.cpu()
    if mode == "fp32":
        assert torch.equal(labels[clear], expected[clear])
    assert distances.min() >= 0 and labels.max() < centroids.shape[0]


@pytest.mark.parametrize("mode", ["deterministic", "atomic"])
def test_cuda_kmeans_update_paths(mode):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5000, 48, generator=generator)
    labels = torch.randint(0, 37, (5000,), generator=generator)
    sums, counts = kmeans_update(x, labels, 40)
    got_sums, got_counts = kmeans_update(x.cuda(), labels.cuda(), 40, deterministic=mode == "deterministic")
    assert torch.equal(got_counts.cpu(), counts)
    torch.testing.assert_close(got_sums.cpu(), sums, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------------- ODC
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_cuda_odc_update_matches_cpu(dtype, tf32_on):
    """Duplicates in the batch, TF32 similarity GEMM (float32) settled in float64: the same labels, counts
    and exact class sums as the CPU kernel."""
    generator = torch.Generator().manual_seed(4)
    memory = make_memory(600, 64, 300, dtype, generator=generator)
    gpu = to_cuda(clone_all(memory))
    for _ in range(3):
        indices = torch.randint(0, 600, (256,), generator=generator)
        features = torch.randn(256, 64, dtype=dtype, generator=generator)
        expected = UPDATE(*memory, indices, features, 0.5)
        got = odc.odc_update_samples(*gpu, indices.cuda(), features.cuda(), 0.5)
        assert int(got) == int(expected)
    torch.testing.assert_close(gpu[0].cpu(), memory[0], **BANK_TOLERANCE[dtype])
    assert torch.equal(gpu[1].cpu(), memory[1]) and torch.equal(gpu[2].cpu(), memory[2])
    # The maintained sums are exactly the fixed-point sums of the GPU's bank (whose last bits may differ
    # from the CPU's: the norms are summed in another order).
    fresh_sums, fresh_counts = torch.zeros_like(gpu[3]), torch.zeros_like(gpu[2])
    odc.odc_class_sums_reference(gpu[0], gpu[1], fresh_sums, fresh_counts)
    assert torch.equal(gpu[3], fresh_sums)


@pytest.mark.parametrize("bad", ["index", "label"])
def test_cuda_odc_refuses_bad_batches(bad):
    """Refused on the device: nothing changes, no sticky device assert, the wrapper raises, later calls work."""
    memory = to_cuda(make_memory(50, 16, 8, generator=torch.Generator().manual_seed(5)))
    indices = torch.tensor([1, 2, 3], device="cuda")
    if bad == "index":
        indices[1] = 50
    else:
        memory[1][2] = 8
    before = clone_all(memory)
    features = torch.randn(3, 16, device="cuda")
    changes = odc.odc_update_samples(*memory, indices, features, check=False)
    assert int(changes) == -(odc.INDEX_OUT_OF_RANGE if bad == "index" else odc.LABEL_OUT_OF_RANGE)
    for got, want in zip(memory, before):
        assert torch.equal(got, want)
    with pytest.raises(IndexError if bad == "index" else ValueError):
        odc.odc_update_samples(*memory, indices, features)
    memory[1][2] = 0
    assert int(odc.odc_update_samples(*memory, torch.tensor([1, 2, 3], device="cuda"), features)) >= 0
    torch.cuda.synchronize()


def test_cuda_odc_nan_similarity_matches_cpu():
    """NaN in the first 256 classes: the first value of every thread's scan is NaN (the old kernel's lanes
    then ignored the rest and could disagree)."""
    generator = torch.Generator().manual_seed(6)
    memory = make_memory(400, 32, 1000, generator=generator)
    memory[4][:256] = float("nan")
    gpu = to_cuda(clone_all(memory))
    indices = torch.randint(0, 400, (128,), generator=generator)
    features = torch.randn(128, 32, generator=generator)
    assert int(UPDATE(*memory, indices, features, 0.5)) == int(UPDATE(*gpu, indices.cuda(), features.cuda(), 0.5))
    assert torch.equal(gpu[1].cpu(), memory[1])


def test_cuda_odc_class_sums_refuses_bad_label():
    bank, labels, counts, sums, _ = to_cuda(make_memory(30, 4, 3, generator=torch.Generator().manual_seed(7)))
    labels[11] = 3
    before = (counts.clone(), sums.clone())
    with pytest.raises(RuntimeError, match=r"label_bank\[11\] = 3 is not a class in \[0, 3\)"):
        torch.ops.pydc.odc_class_sums(bank, labels, sums, counts)
    assert torch.equal(counts, before[0]) and torch.equal(sums, before[1])
    labels[11] = 0
    torch.ops.pydc.odc_class_sums(bank, labels, sums, counts)  # the device is still usable
    assert int(counts.sum()) == 30


def test_cuda_odc_centroids_op_moves_the_version():
    """The centroid-norm cache of odc_update_samples is keyed on the version counter."""
    _, _, counts, sums, centroids = to_cuda(make_memory(20, 4, 3, generator=torch.Generator().manual_seed(8)))
    version = centroids._version
    torch.ops.pydc.odc_centroids_from_sums(sums, counts, centroids, 20)
    assert centroids._version > version


def test_cuda_odc_labels_follow_rescaled_centroids():
    """Centroids scaled in place by 100 (a larger error bound): labels still equal the CPU's, so the cached
    norm was refreshed."""
    generator = torch.Generator().manual_seed(9)
    memory = make_memory(300, 32, 200, generator=generator)
    gpu = to_cuda(clone_all(memory))
    for scale in (1.0, 100.0):
        memory[4].mul_(scale)
        gpu[4].mul_(scale)
        indices = torch.randint(0, 300, (128,), generator=generator)
        features = torch.randn(128, 32, generator=generator)
        UPDATE(*memory, indices, features, 0.5)
        UPDATE(*gpu, indices.cuda(), features.cuda(), 0.5)
        assert torch.equal(gpu[1].cpu(), memory[1])
