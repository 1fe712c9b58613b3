"""sobel_normalize beside the unfused torch chain (to float, normalize, 1x1 grey conv, 3x3 Sobel conv)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pydc  # noqa: F401  (registers torch.ops.pydc)
from benchmarks.conftest import DEVICES, pair_roles, synchronized
from pydc.ops.sobel import IMAGENET_MEAN, IMAGENET_STD, SOBEL_KERNELS, sobel_normalize_reference

# CPU: a batch this 2-core machine handles in well under a second; CUDA: one ImageNet training batch.
SHAPES = {"cpu": (32, 3, 224, 224), "cuda": (256, 3, 224, 224)}
H100_COPY_BYTES_PER_S = 3.0e12  # measured device-to-device copy rate on the H100 (DESIGN.md)


def torch_chain(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, grey_weight, sobel_weight):
    x = images.float().div_(255.0)
    x = (x - mean) / std
    grey = F.conv2d(x, grey_weight)
    return F.conv2d(grey, sobel_weight, padding=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["pydc", "reference"])
def test_sobel_normalize(benchmark, device, impl):
    shape = SHAPES[device]
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    group = f"sobel_normalize {device} {'x'.join(map(str, shape))} uint8->float32"
    pair_roles(benchmark, group, impl, "torch chain")
    if impl == "pydc":
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        fn = synchronized(lambda: torch.ops.pydc.sobel_normalize(images, mean, std, None), device)
        moved = images.numel() + images.numel() // 3 * 2 * 4  # uint8 read + float32 (B,2,H,W) written
        benchmark.extra_info["bytes"] = moved
        if device == "cuda":
            benchmark.extra_info["floor_s"] = moved / H100_COPY_BYTES_PER_S
    else:
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        grey_weight = torch.full((1, 3, 1, 1), 1.0 / 3.0, device=device)
        sobel_weight = torch.tensor(SOBEL_KERNELS, device=device).unsqueeze(1)
        fn = synchronized(lambda: torch_chain(images, mean, std, grey_weight, sobel_weight), device)
    out = fn()  # warm-up (allocator, cuDNN algorithm choice); both sides of the pair must match the reference
    torch.testing.assert_close(out, sobel_normalize_reference(images), rtol=1e-5, atol=1e-4)
    out = benchmark(fn)
    assert out.shape == (shape[0], 2, shape[2], shape[3])
