"""FeatureLoader / TrainLoader: backends agree, order and shards are exact, augmentation is reproducible.

Tolerance between backends (feature pass, PNG input): decoding agrees bitwise (lossless PNG, both give the
same RGB), so batches are bitwise equal when no resampling happens; when the resize upsamples (the digits:
32 -> 36) rows differ by at most 1 (rounding); when it downsamples, DALI's and torchvision's antialiasing
filters differ: on random-noise images, the worst case, the mean absolute difference stays below 1 grey
level and the maximum below 16 (natural images differ far less).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pydc.data import Batch, FeatureLoader, ImageFolderIndex, TrainLoader
from pydc.data.dali_backend import dali_available
from pydc.data.geometry import random_resized_crops

# pytest resets warning filters per test; pydc.data.decode silences this torchvision deprecation at import.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*image decoding and encoding capabilities of TorchVision are deprecated:DeprecationWarning")

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not installed")


def _write_pngs(root, sizes, classes=3, seed=0):
    """Random RGB PNGs of the given (height, width) sizes, spread over `classes` class folders."""
    rng = np.random.default_rng(seed)
    for number, (height, width) in enumerate(sizes):
        folder = root / f"class_{number % classes}"
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{number:03d}.png")
    return ImageFolderIndex(root, use_cache=False)


@pytest.fixture(scope="module")
def mixed_index(tmp_path_factory):
    sizes = [(40, 48), (48, 40), (37, 53), (64, 30), (33, 33), (50, 45), (29, 61), (45, 45)] * 3
    return _write_pngs(tmp_path_factory.mktemp("mixed"), sizes)


@pytest.fixture(scope="module")
def square_index(tmp_path_factory):
    return _write_pngs(tmp_path_factory.mktemp("square"), [(36, 36)] * 10)


def _cat(loader):
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    return (torch.cat([b.images for b in batches]), torch.cat([b.indices for b in batches]),
            torch.cat([b.labels for b in batches]) if batches[0].labels is not None else None)


def test_feature_pass_every_sample_once_in_order(mixed_index):
    loader = FeatureLoader(mixed_index, 24, 5, backend="torchvision", cache_in_memory=False)
    batches = list(loader)
    assert [len(b.indices) for b in batches] == [5, 5, 5, 5, 4]  # last batch partial, not padded
    images, indices, labels = _cat(loader)
    assert torch.equal(indices, torch.arange(len(mixed_index)))
    assert torch.equal(labels, torch.tensor(mixed_index.labels))
    assert images.shape == (len(mixed_index), 3, 24, 24) and images.dtype == torch.uint8
    assert loader.stats == {"decoded": len(mixed_index), "skipped": 0, "skipped_files": []}


def test_memory_cache_matches_decoding_from_disk(mixed_index):
    cached = FeatureLoader(mixed_index, 24, 7, backend="torchvision", cache_in_memory=True)
    streamed = FeatureLoader(mixed_index, 24, 7, backend="torchvision", cache_in_memory=False)
    assert cached.memory is not None and streamed.memory is None
    assert torch.equal(_cat(cached)[0], _cat(streamed)[0])
    order = torch.tensor([5, 5, 0, 23, 7, 5, 11])
    train_cached = TrainLoader(mixed_index, 20, 4, backend="torchvision", seed=3, cache_in_memory=True)
    train_streamed = TrainLoader(mixed_index, 20, 4, backend="torchvision", seed=3, cache_in_memory=False)
    for loader in (train_cached, train_streamed):
        loader.set_order(order)
        loader.set_epoch(2)
    assert torch.equal(_cat(train_cached)[0], _cat(train_streamed)[0])


def test_stacked_memory_cache_matches_per_image_path(square_index):
    cached = FeatureLoader(square_index, 28, 4, backend="torchvision", cache_in_memory=True)
    assert cached.memory.stacked is not None  # all images 36x36: the batched path
    streamed = FeatureLoader(square_index, 28, 4, backend="torchvision", cache_in_memory=False)
    assert torch.equal(_cat(cached)[0], _cat(streamed)[0])


@needs_dali
def test_backends_agree_bitwise_without_resampling(square_index):
    # size 32 -> shorter side int(32 * 256 / 224) = 36 = the images' size: decode + centre crop only.
    dali = FeatureLoader(square_index, 32, 4, backend="dali")
    torchvision = FeatureLoader(square_index, 32, 4, backend="torchvision", cache_in_memory=False)
    dali_images, dali_indices, _ = _cat(dali)
    tv_images, tv_indices, _ = _cat(torchvision)
    assert dali._decoder.fallback_batches == 0
    assert torch.equal(dali_indices, tv_indices)
    assert torch.equal(dali_images, tv_images)


@needs_dali
def test_backends_agree_within_tolerance_with_resampling(mixed_index):
    dali = FeatureLoader(mixed_index, 24, 6, backend="dali")
    torchvision = FeatureLoader(mixed_index, 24, 6, backend="torchvision")
    dali_images, dali_indices, dali_labels = _cat(dali)
    tv_images, tv_indices, tv_labels = _cat(torchvision)
    assert dali._decoder.fallback_batches == 0
    assert torch.equal(dali_indices, tv_indices) and torch.equal(dali_labels, tv_labels)
    difference = (dali_images.int() - tv_images.int()).abs()
    assert difference.float().mean() < 1.0 and difference.max() <= 16


@needs_dali
def test_backends_agree_on_upsampled_digits_like_images(tmp_path):
    index = _write_pngs(tmp_path, [(32, 32)] * 12)
    dali_images = _cat(FeatureLoader(index, 32, 5, backend="dali"))[0]
    tv_images = _cat(FeatureLoader(index, 32, 5, backend="torchvision"))[0]
    assert (dali_images.int() - tv_images.int()).abs().max() <= 1


@needs_dali
def test_backends_cut_the_same_training_windows(mixed_index):
    order = torch.tensor([3, 3, 9, 0, 17, 3, 22, 1, 1])
    loaders = [TrainLoader(mixed_index, 20, 4, backend=b, seed=5) for b in ("dali", "torchvision")]
    for loader in loaders:
        loader.set_order(order)
        loader.set_epoch(4)
    (dali_images, dali_indices, _), (tv_images, tv_indices, _) = _cat(loaders[0]), _cat(loaders[1])
    assert loaders[0]._decoder.fallback_batches == 0
    assert torch.equal(dali_indices, order) and torch.equal(tv_indices, order)
    difference = (dali_images.int() - tv_images.int()).abs()
    assert difference.float().mean(dim=(1, 2, 3)).max() < 2.0  # same window and flip per row; filters differ


@needs_dali
def test_backends_ignore_exif_orientation_alike(tmp_path):
    # A camera JPEG tagged "rotate 90": both backends must keep the stored pixel grid (PIL's header sizes,
    # which the crop windows are computed from, describe that grid).
    y, x = np.mgrid[0:40, 0:64]
    pixels = np.stack([x * 4, y * 6, (x + y) * 2], axis=2).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    index = ImageFolderIndex(tmp_path, use_cache=False)
    dali_images = _cat(FeatureLoader(index, 32, 1, backend="dali"))[0]
    tv_images = _cat(FeatureLoader(index, 32, 1, backend="torchvision"))[0]
    assert (dali_images.int() - tv_images.int()).abs().float().mean() < 2.0


@pytest.mark.parametrize("backend", ["torchvision", pytest.param("dali", marks=needs_dali)])
def test_training_order_honoured_with_duplicates(mixed_index, backend):
    loader = TrainLoader(mixed_index, 16, 4, backend=backend, seed=1)
    order = torch.tensor([7, 7, 7, 2, 19, 0, 2, 23, 7, 11, 11])
    loader.set_order(order)
    images, indices, labels = _cat(loader)
    assert torch.equal(indices, order)
    assert torch.equal(labels, torch.tensor(mixed_index.labels)[order])
    assert images.shape == (len(order), 3, 16, 16)
    assert loader.stats["decoded"] == len(order)


def test_training_reproducible_given_seed_and_epoch(mixed_index):
    def epoch_images(seed, epoch):
        loader = TrainLoader(mixed_index, 16, 8, backend="torchvision", seed=seed)
        loader.set_order(torch.arange(len(mixed_index)).flip(0))
        loader.set_epoch(epoch)
        return _cat(loader)[0]

    first = epoch_images(0, 1)
    assert torch.equal(first, epoch_images(0, 1))
    assert not torch.equal(first, epoch_images(0, 2))
    assert not torch.equal(first, epoch_images(1, 1))


def test_random_resized_crop_windows_follow_torchvision_rule():
    heights = np.full(4000, 300)
    widths = np.full(4000, 400)
    windows = random_resized_crops(heights, widths, seed=0, epoch=0, batch_number=0)
    assert (windows.top >= 0).all() and (windows.left >= 0).all()
    assert (windows.top + windows.height <= heights).all() and (windows.left + windows.width <= widths).all()
    area = windows.height * windows.width / (300 * 400)
    assert area.min() >= 0.07 and area.max() <= 1.0
    aspect = windows.width / windows.height
    assert aspect.min() > 0.7 and aspect.max() < 1.4
    assert 0.45 < windows.flip.mean() < 0.55
    # A very thin image makes every draw miss: the fallback is a centred crop with the aspect ratio clamped.
    thin = random_resized_crops([1000], [10], seed=0, epoch=0, batch_number=0)
    assert thin.width[0] == 10 and thin.height[0] == round(10 / 0.75) and thin.top[0] == (1000 - 13) // 2


def test_crop_scale_bounds_the_window_area(mixed_index):
    heights, widths = np.full(2000, 300), np.full(2000, 400)
    windows = random_resized_crops(heights, widths, seed=0, epoch=0, batch_number=0, scale=(0.5, 1.0))
    area = windows.height * windows.width / (300 * 400)
    assert area.min() >= 0.49 and area.max() <= 1.0
    default = random_resized_crops(heights, widths, seed=0, epoch=0, batch_number=0)
    assert (default.height * default.width / (300 * 400)).min() < 0.2  # the (0.08, 1) range reaches small crops
    loader = TrainLoader(mixed_index, 16, 4, crop_scale=(0.5, 1.0), backend="torchvision")
    assert loader.crop_scale == (0.5, 1.0)
    with pytest.raises(ValueError, match="crop_scale"):
        TrainLoader(mixed_index, 16, 4, crop_scale=(0.0, 1.0))


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_feature_shards_cover_the_dataset_exactly_once(mixed_index, world_size):
    shards = [_cat(FeatureLoader(mixed_index, 16, 3, rank=rank, world_size=world_size, backend="torchvision"))[1]
              for rank in range(world_size)]
    assert torch.equal(torch.cat(shards), torch.arange(len(mixed_index)))


def test_breaking_out_of_an_epoch_leaves_the_loader_usable(mixed_index):
    loader = FeatureLoader(mixed_index, 16, 2, backend="torchvision", cache_in_memory=False)
    for _ in loader:  # a trainer stopping on a non-finite loss: batches already queued are dropped
        break
    assert torch.equal(_cat(loader)[1], torch.arange(len(mixed_index)))
    assert loader.stats["decoded"] == len(mixed_index)  # nothing from the abandoned epoch leaks in


def test_progress_bar_is_silent_without_a_terminal(mixed_index, capsys):
    loader = FeatureLoader(mixed_index, 16, 4, backend="torchvision", progress=True)
    assert len(_cat(loader)[1]) == len(mixed_index) and len(loader) == 6
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # pytest's captured stderr is not a TTY


def test_loader_rejects_bad_arguments(mixed_index):
    with pytest.raises(ValueError, match="backend"):
        FeatureLoader(mixed_index, 16, 4, backend="opencv")
    with pytest.raises(ValueError, match="rank"):
        FeatureLoader(mixed_index, 16, 4, rank=2, world_size=2)
    loader = TrainLoader(mixed_index, 16, 4)
    with pytest.raises(ValueError, match="sample indices"):
        loader.set_order([0, len(mixed_index)])


@pytest.mark.cuda
def test_cuda_feature_pass_matches_cpu(mixed_index):
    # PNGs decode on the CPU either way; the GPU resizes in float and rounds, the CPU in fixed point.
    cpu_images, cpu_indices, _ = _cat(FeatureLoader(mixed_index, 24, 5, backend="torchvision", device="cpu",
                                                    cache_in_memory=False))
    gpu = FeatureLoader(mixed_index, 24, 5, backend="torchvision", device="cuda", cache_in_memory=False)
    gpu_images, gpu_indices, _ = _cat(gpu)
    assert gpu_images.device.type == "cuda" and torch.equal(gpu_indices, cpu_indices)
    assert (gpu_images.cpu().int() - cpu_images.int()).abs().max() <= 1


@pytest.mark.cuda
def test_cuda_jpeg_decoding_matches_cpu(tmp_path):
    from pydc.data import synthetic_jpegs

    synthetic_jpegs(tmp_path / "jpegs", 6, size=(120, 90), seed=2)
    index = ImageFolderIndex(tmp_path / "jpegs", use_cache=False)
    cpu_images = _cat(FeatureLoader(index, 64, 4, backend="torchvision", device="cpu", cache_in_memory=False))[0]
    gpu_images = _cat(FeatureLoader(index, 64, 4, backend="torchvision", device="cuda", cache_in_memory=False))[0]
    difference = (gpu_images.cpu().int() - cpu_images.int()).abs()
    assert difference.float().mean() < 2.0  # nvJPEG and libjpeg-turbo differ in IDCT and chroma upsampling


@pytest.mark.cuda
def test_cuda_training_from_memory(mixed_index):
    order = torch.tensor([4, 4, 1, 20, 13, 4])
    loaders = [TrainLoader(mixed_index, 16, 4, device=device, backend="torchvision", seed=2) for device in
               ("cpu", "cuda")]
    for loader in loaders:
        loader.set_order(order)
    (cpu_images, cpu_indices, _), (gpu_images, gpu_indices, _) = _cat(loaders[0]), _cat(loaders[1])
    assert loaders[1].memory is not None and gpu_images.device.type == "cuda"
    assert torch.equal(cpu_indices, order) and torch.equal(gpu_indices, order)
    assert (gpu_images.cpu().int() - cpu_images.int()).abs().max() <= 1


@pytest.mark.cuda
@needs_dali
def test_dali_mixed_decoding_matches_cpu_graph(mixed_index):
    cpu_images = _cat(FeatureLoader(mixed_index, 24, 5, backend="dali", device="cpu"))[0]
    gpu = FeatureLoader(mixed_index, 24, 5, backend="dali", device="cuda")
    gpu_images = _cat(gpu)[0]
    assert gpu._decoder.fallback_batches == 0 and gpu_images.device.type == "cuda"
    assert (gpu_images.cpu().int() - cpu_images.int()).abs().float().mean() < 1.0
