"""sobel_normalize: kernels against the float64 torch chain, autograd, compile, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pydc
from pydc.nn import SobelStem
from pydc.ops import IMAGENET_MEAN, IMAGENET_STD, sobel_normalize, sobel_normalize_reference
from tests.conftest import cpu_and_cuda, random_images

OP = torch.ops.pydc.sobel_normalize

# Output tolerances against the float64 chain, by output dtype. Outputs reach about +-30 (Sobel of
# normalized grey), so the float32 atol covers float32 accumulation; the narrow types are bounded by
# their own rounding of the result.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=5e-5),
    torch.float16: dict(rtol=1e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-2),
}

SIZES = [  # (B, H, W): degenerate sizes, odd sizes, sizes that are not multiples of the CUDA tile (64 x 16)
    (2, 1, 1), (1, 1, 7), (1, 7, 1), (2, 2, 3), (1, 3, 2), (3, 7, 7), (2, 17, 70), (1, 33, 129), (2, 64, 64),
]
IN_DTYPES = [torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.float64]
OUT_DTYPES = [None, torch.float16, torch.bfloat16, torch.float64]
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def layout(images: torch.Tensor, name: str) -> torch.Tensor:
    if name == "channels_last":
        return images.contiguous(memory_format=torch.channels_last)
    if name == "strided":  # every other column of a wider tensor: neither layout, copied by the op
        wide = torch.repeat_interleave(images, 2, dim=3)
        return wide[..., ::2]
    return images.contiguous()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("memory", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_chain(device, in_dtype, out_dtype, memory, size, poisoned):
    batch, height, width = size
    images = layout(random_images((batch, 3, height, width), in_dtype, device), memory)
    out = OP(images, list(MEAN), list(STD), out_dtype)
    expected = sobel_normalize_reference(images, MEAN, STD, out_dtype=torch.float64)
    assert out.shape == (batch, 2, height, width)
    assert out.dtype == (out_dtype or torch.float32)
    assert out.device == images.device
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[out.dtype])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_channels_last_in_channels_last_out(device):
    images = random_images((2, 3, 9, 11), torch.uint8, device).contiguous(memory_format=torch.channels_last)
    out = OP(images, list(MEAN), list(STD), None)
    assert out.is_contiguous(memory_format=torch.channels_last)
    contiguous_out = OP(images.contiguous(), list(MEAN), list(STD), None)
    assert contiguous_out.is_contiguous()
    torch.testing.assert_close(out, contiguous_out, rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_batch_zero(device):
    images = torch.empty((0, 3, 5, 6), dtype=torch.uint8, device=device)
    out = OP(images, list(MEAN), list(STD), torch.float16)
    assert out.shape == (0, 2, 5, 6) and out.dtype == torch.float16


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_padding_is_zero_in_normalized_space(device):
    # A constant image has zero gradient inside; on the border the zero padding sees the constant's
    # normalized grey value g as a step, so Gx at the left column is -(1 + 2 + 1) * g (+ corner terms).
    value = 0.75
    images = torch.full((1, 3, 4, 5), value, dtype=torch.float64, device=device)
    out = OP(images, list(MEAN), list(STD), torch.float64)
    grey = sum((value - m) / s for m, s in zip(MEAN, STD)) / 3.0
    assert out[0, :, 1:-1, 1:-1].abs().max().item() < 1e-12
    torch.testing.assert_close(out[0, 0, 1:-1, 0], torch.full((2,), -4.0 * grey, dtype=torch.float64, device=device))
    torch.testing.assert_close(out[0, 0, 1:-1, -1], torch.full((2,), 4.0 * grey, dtype=torch.float64, device=device))
    torch.testing.assert_close(out[0, 1, 0, 1:-1], torch.full((3,), -4.0 * grey, dtype=torch.float64, device=device))


@pytest.mark.cuda
def test_cuda_equals_cpu_kernel():
    images = random_images((4, 3, 37, 101), torch.uint8)
    cpu = OP(images, list(MEAN), list(STD), None)
    gpu = OP(images.cuda(), list(MEAN), list(STD), None).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-6, atol=1e-5)


@pytest.mark.cuda
def test_cuda_misaligned_input_takes_scalar_path():
    base = random_images((1 * 3 * 16 * 64 + 1,), torch.uint8, "cuda")
    images = base[1:].view(1, 3, 16, 64)  # data pointer off by one byte: vector loads are not allowed
    out = OP(images, list(MEAN), list(STD), None)
    torch.testing.assert_close(out.double(), sobel_normalize_reference(images, MEAN, STD, torch.float64),
                               **TOLERANCES[torch.float32])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32])
def test_opcheck(device, in_dtype):
    images = random_images((2, 3, 6, 9), in_dtype, device)
    if in_dtype.is_floating_point:
        images.requires_grad_(True)
    torch.library.opcheck(OP, (images, list(MEAN), list(STD)), {"out_dtype": None})
    torch.library.opcheck(OP, (images, list(MEAN), list(STD)), {"out_dtype": torch.float16})


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_gradcheck_float64(device):
    images = random_images((2, 3, 5, 6), torch.float64, device).requires_grad_(True)
    fn = lambda x: OP(x, list(MEAN), list(STD), torch.float64)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (images,))
    assert torch.autograd.gradgradcheck(fn, (images,))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
def test_gradient_matches_chain(device, memory):
    images = layout(random_images((2, 3, 7, 10), torch.float32, device), memory).requires_grad_(True)
    grad = torch.randn((2, 2, 7, 10), device=device)
    (OP(images, list(MEAN), list(STD), None) * grad).sum().backward()
    reference_images = images.detach().clone().requires_grad_(True)
    (sobel_normalize_reference(reference_images, MEAN, STD, torch.float32, torch.float32) * grad).sum().backward()
    assert images.grad.dtype == torch.float32
    torch.testing.assert_close(images.grad, reference_images.grad, rtol=1e-5, atol=1e-5)


def test_uint8_images_have_no_gradient():
    out = OP(random_images((1, 3, 4, 4), torch.uint8), list(MEAN), list(STD), None)
    assert not out.requires_grad


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_stem_inside_compiled_model(device):
    torch._dynamo.reset()
    model = torch.nn.Sequential(SobelStem(MEAN, STD), torch.nn.Conv2d(2, 4, 3, padding=1)).to(device)
    compiled = torch.compile(model, fullgraph=True)
    images = random_images((2, 3, 12, 20), torch.uint8, device)
    torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-5)
    float_images = random_images((2, 3, 12, 20), torch.float32, device).requires_grad_(True)
    compiled(float_images).sum().backward()
    assert float_images.grad is not None and torch.isfinite(float_images.grad).all()


def test_stem_module():
    stem = SobelStem()
    assert stem.mean == IMAGENET_MEAN and stem.std == IMAGENET_STD
    assert "mean=" in repr(stem) and list(stem.parameters()) == []
    images = random_images((1, 3, 8, 8), torch.uint8)
    torch.testing.assert_close(stem(images), sobel_normalize(images))
    with pytest.raises(ValueError, match="3 mean and 3 std"):
        SobelStem(mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="non-zero"):
        SobelStem(std=(0.2, 0.0, 0.2))


BAD_INPUTS = [
    (lambda: torch.zeros((2, 1, 4, 4), dtype=torch.uint8), MEAN, STD, "3 RGB channels"),
    (lambda: torch.zeros((2, 4, 4, 4), dtype=torch.uint8), MEAN, STD, "3 RGB channels"),
    (lambda: torch.zeros((3, 4, 4), dtype=torch.uint8), MEAN, STD, "4-D|shape \\(B, 3, H, W\\)"),
    (lambda: torch.zeros((1, 3, 4, 4), dtype=torch.int32), MEAN, STD, "uint8, float32"),
    (lambda: torch.zeros((1, 3, 4, 4)), (0.5, 0.5), STD, "3 values"),
    (lambda: torch.zeros((1, 3, 4, 4)), MEAN, (0.2, 0.2, 0.2, 0.2), "3 values"),
    (lambda: torch.zeros((1, 3, 4, 4)), MEAN, (0.2, 0.0, 0.2), "std\\[1\\] is 0"),
]


@pytest.mark.parametrize("make_images,mean,std,message", BAD_INPUTS)
def test_bad_input_raw_op(make_images, mean, std, message):
    with pytest.raises(RuntimeError, match=message):
        OP(make_images(), list(mean), list(std), None)


@pytest.mark.parametrize("make_images,mean,std,message", BAD_INPUTS)
def test_bad_input_wrapper(make_images, mean, std, message):
    with pytest.raises(ValueError, match=message):
        sobel_normalize(make_images(), mean, std)


def test_bad_out_dtype():
    images = random_images((1, 3, 4, 4), torch.uint8)
    with pytest.raises(RuntimeError, match="out_dtype"):
        OP(images, list(MEAN), list(STD), torch.int32)
    with pytest.raises(ValueError, match="out_dtype"):
        sobel_normalize(images, out_dtype=torch.int64)


def test_statistics_on_another_device():
    images = random_images((1, 3, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="mean is a tensor on meta but images are on cpu"):
        sobel_normalize(images, torch.tensor(MEAN, device="meta"), STD)
    # Statistics given as CPU tensors are read as floats.
    torch.testing.assert_close(sobel_normalize(images, torch.tensor(MEAN), torch.tensor(STD)),
                               sobel_normalize(images, MEAN, STD))


def test_fallback_without_compiled_ops(monkeypatch):
    import pydc.ops.sobel as sobel_module

    monkeypatch.setattr(sobel_module, "HAS_OPS", False)
    images = random_images((2, 3, 9, 5), torch.uint8)
    with pytest.warns(RuntimeWarning, match="pure-torch reference"):
        out = sobel_module.sobel_normalize(images, MEAN, STD)
    torch.testing.assert_close(out, OP(images, list(MEAN), list(STD), None), rtol=1e-5, atol=1e-5)


def test_reference_is_the_documented_chain():
    # Spell out DeepCluster's stem as its original modules: Normalize, then the grey and Sobel convolutions.
    images = random_images((2, 3, 6, 7), torch.float64)
    normalized = (images - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        STD, dtype=torch.float64).view(1, 3, 1, 1)
    grey = normalized.mean(dim=1, keepdim=True)
    gx = torch.tensor([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=torch.float64)
    gy = torch.tensor([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=torch.float64)
    expected = F.conv2d(grey, torch.stack([gx, gy]).unsqueeze(1), padding=1)
    torch.testing.assert_close(sobel_normalize_reference(images, MEAN, STD, torch.float64), expected)
