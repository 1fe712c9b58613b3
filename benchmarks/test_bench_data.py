"""Data loading throughput on synthetic 500x375 JPEGs (pydc.data.synthetic_jpegs), one pass per round.

CPU (this machine, 2 threads each): the DALI CPU pipeline (FeatureLoader(backend="dali")) and pydc's
threaded torchvision backend, each beside a torch DataLoader with as many worker processes doing the same
decode (torchvision.io.decode_jpeg) + Resize(256) + CenterCrop(224) on the same files. The printed ratio is
DataLoader time / pydc time (> 1: pydc is faster); extra_info["images_per_s"] gives the rates.

CUDA (device script): torchvision GPU decoding (nvJPEG, batched) beside CPU decoding, both ending in a
uint8 batch on the GPU; and the feature pass (GPU decode + crop + a ResNet-50 forward) beside the model alone
on device-resident batches of the same shape (ratio = model-only time / feature-pass time, goal >= 0.85).

Before any timing, both sides of a decode pair make one pass and their images must agree (assert_same_images:
same samples, mean pixel difference within the decoders' rounding). The feature pass has no such check: its
reference is the model alone on random resident batches, a cost floor rather than another implementation.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset

from benchmarks.conftest import DEVICES, synchronized
from pydc.data import FeatureLoader, ImageFolderIndex, synthetic_jpegs
from pydc.data.cache import cache_dir
from pydc.data.dali_backend import dali_available

IMAGES = 256
SIZE = 224
BATCH = 32
THREADS = 2  # this machine's cores; the DataLoader gets as many worker processes


@pytest.fixture(scope="module")
def jpeg_index():
    folder = cache_dir() / f"bench-jpegs-{IMAGES}"
    if len([name for name in os.listdir(folder)] if folder.exists() else []) != IMAGES:
        synthetic_jpegs(folder, IMAGES, size=(500, 375), seed=0)
    return ImageFolderIndex(folder)


class _DecodeCrop(Dataset):
    """The reference pipeline: read, torchvision decode, Resize(256) + CenterCrop(224), as a Dataset."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, position):
        from torchvision.io import ImageReadMode, decode_image, read_file

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = decode_image(read_file(self.paths[position]), mode=ImageReadMode.RGB)
        return TF.center_crop(TF.resize(image, [int(SIZE * 256 / 224)], antialias=True), [SIZE, SIZE]), position


def _pass_images(batches):
    """The whole pass as (sample indices, uint8 images on the CPU), sorted by sample index."""
    indices, images = [], []
    for batch_images, batch_indices in batches:
        images.append(batch_images.cpu())
        indices.append(torch.as_tensor(batch_indices, dtype=torch.int64).cpu())
    indices, images = torch.cat(indices), torch.cat(images)
    order = indices.argsort()
    return indices[order], images[order]


def _pydc_images(loader):
    return _pass_images((batch.images, batch.indices) for batch in loader)


def _dataloader_images(loader):
    return _pass_images(loader)


# Largest (mean, max) |pydc - reference| in uint8 levels per pair. The torchvision backend runs the same
# decode and antialiased resize as the reference (measured: identical); DALI's decoder and resize round
# differently (measured: mean 0.16, max 1 on this machine's AMD EPYC; a one-pixel shift is 1.5). GPU vs CPU
# decode (nvJPEG vs libjpeg-turbo) is not measured yet: a loose bound that still fails on flipped or
# mismatched images.
TOLERANCE_LEVELS = {"torchvision": (0.01, 1), "dali": (1.0, 16), "cuda": (3.0, 128)}


def assert_same_images(ours, theirs, what):
    """Both passes cover every image once and their pixels agree (before any timing)."""
    (our_indices, our_images), (their_indices, their_images) = ours, theirs
    assert torch.equal(our_indices, torch.arange(IMAGES)) and torch.equal(their_indices, our_indices)
    assert our_images.shape == their_images.shape == (IMAGES, 3, SIZE, SIZE)
    assert our_images.dtype == their_images.dtype == torch.uint8
    difference = (our_images.int() - their_images.int()).abs().double()
    mean, largest = TOLERANCE_LEVELS[what]
    assert difference.mean() <= mean and difference.max() <= largest, \
        f"{what}: pixels differ by {difference.mean():.3f} levels on average, {difference.max():.0f} at most"


def _dataloader_pass(loader, device):
    count = 0
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        count += len(images)
    return count


def _pydc_pass(loader):
    return sum(len(batch.indices) for batch in loader)


def _dataloader(index):
    return DataLoader(_DecodeCrop(index.paths), batch_size=BATCH, num_workers=THREADS, persistent_workers=True,
                      prefetch_factor=2)


@pytest.mark.parametrize("impl", ["pydc", "reference"])
@pytest.mark.parametrize("backend", [pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                                    reason="DALI not installed")),
                                     "torchvision"])
def test_cpu_decode_crop(benchmark, jpeg_index, backend, impl):
    benchmark.group = f"feature pass cpu {IMAGES} JPEG 500x375 -> {SIZE}, {THREADS} threads: {backend}"
    benchmark.extra_info["role"] = impl
    ours = FeatureLoader(jpeg_index, SIZE, BATCH, device="cpu", backend=backend, num_threads=THREADS,
                         cache_in_memory=False)
    reference = _dataloader(jpeg_index)
    # Warm-up of both sides (worker start, pipeline build, page cache) and the check that they agree.
    assert_same_images(_pydc_images(ours), _dataloader_images(reference), backend)
    if impl == "pydc":
        loader = ours
        run = lambda: _pydc_pass(loader)  # noqa: E731
    else:
        benchmark.extra_info["reference"] = f"DataLoader({THREADS} workers)"
        loader = reference
        run = lambda: _dataloader_pass(loader, "cpu")  # noqa: E731
    assert run() == IMAGES
    count = benchmark.pedantic(run, rounds=5, iterations=1)  # 5: this shared 2-core machine is noisy
    assert count == IMAGES
    benchmark.extra_info["images_per_s"] = IMAGES / benchmark.stats.stats.median


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["pydc", "reference"])
def test_cuda_decode(benchmark, jpeg_index, impl):
    """GPU decode (nvJPEG via torchvision) beside CPU decode (16 threads), both ending on the GPU."""
    threads = min(16, os.cpu_count() or 1)
    benchmark.group = f"feature pass to cuda {IMAGES} JPEG 500x375 -> {SIZE}: GPU vs CPU decode ({threads} threads)"
    benchmark.extra_info["role"] = impl
    device = "cuda" if impl == "pydc" else "cpu"
    if impl == "reference":
        benchmark.extra_info["reference"] = f"torchvision CPU decode, {threads} threads"
    loader = FeatureLoader(jpeg_index, SIZE, 64, device=device, backend="torchvision", num_threads=threads,
                           cache_in_memory=False)

    def run():
        count = 0
        for batch in loader:
            count += len(batch.images.to("cuda", non_blocking=True))
        torch.cuda.synchronize()
        return count

    other = FeatureLoader(jpeg_index, SIZE, 64, device="cpu" if device == "cuda" else "cuda",
                          backend="torchvision", num_threads=threads, cache_in_memory=False)
    assert_same_images(_pydc_images(loader), _pydc_images(other), "cuda")  # GPU and CPU decode agree
    assert run() == IMAGES
    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["images_per_s"] = IMAGES / benchmark.stats.stats.median


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["pydc", "reference"])
def test_cuda_feature_pass_vs_model_only(benchmark, jpeg_index, impl):
    import torchvision

    batch_size = 64
    benchmark.group = f"feature pass cuda {IMAGES} JPEG 500x375 -> {SIZE} + ResNet-50 bf16: pass vs model only"
    benchmark.extra_info["role"] = impl
    model = torchvision.models.resnet50().cuda().eval().to(memory_format=torch.channels_last)
    mean = torch.tensor([0.485, 0.456, 0.406], device="cuda").view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device="cuda").view(1, 3, 1, 1) * 255

    @torch.no_grad()
    def forward(images):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(((images.float() - mean) / std).contiguous(memory_format=torch.channels_last))

    if impl == "pydc":
        loader = FeatureLoader(jpeg_index, SIZE, batch_size, device="cuda", backend="auto",
                               num_threads=min(16, os.cpu_count() or 1), cache_in_memory=False)
        run = synchronized(lambda: [forward(batch.images) for batch in loader], "cuda")
    else:
        benchmark.extra_info["reference"] = "model only, device-resident batches"
        resident = torch.randint(0, 256, (batch_size, 3, SIZE, SIZE), dtype=torch.uint8, device="cuda")
        run = synchronized(lambda: [forward(resident) for _ in range(-(-IMAGES // batch_size))], "cuda")
    run()
    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["images_per_s"] = IMAGES / benchmark.stats.stats.median
