"""The fused Sobel stem of DeepCluster: `torch.ops.pydc.sobel_normalize`.

Semantics (original DeepCluster, models/alexnet.py), which `sobel_normalize_reference` spells out with plain
torch ops and which the compiled kernels match:

1. uint8 images are scaled by 1/255; floating images are taken as they are.
2. Each channel is normalized, (x - mean_c) / std_c, as torchvision's Normalize does.
3. grey = mean of the three normalized channels (a 1x1 convolution with weights 1/3, bias 0).
4. A 3x3 cross-correlation of grey with Gx = [[1,0,-1],[2,0,-2],[1,0,-1]] and Gy = [[1,2,1],[0,0,0],
   [-1,-2,-1]], zero padding of 1 (a pixel outside the image has grey value 0, i.e. the padding is in
   normalized space), bias 0. The output has 2 channels, (Gx, Gy).

The output is float32 unless `out_dtype` asks for float16, bfloat16 or float64. Channels-last input gives
channels-last output. The op is differentiable with respect to floating images (uint8 images have no
gradient); the backward is the adjoint of steps 2-4, written with torch ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pydc.ops._registry import HAS_OPS, warn_fallback

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INPUT_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.float64)
_OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

SOBEL_KERNELS = (
    ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0)),  # Gx
    ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0)),  # Gy
)


def _sobel_weight(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(SOBEL_KERNELS, dtype=dtype, device=device).unsqueeze(1)  # (2, 1, 3, 3)


def _as_floats(name: str, values, images: torch.Tensor) -> list[float]:
    if isinstance(values, torch.Tensor):
        if values.device != images.device and values.device.type != "cpu":
            raise ValueError(
                f"sobel_normalize: {name} is a tensor on {values.device} but images are on {images.device}; "
                f"pass {name} as 3 Python floats or as a tensor on the CPU or on {images.device}"
            )
        values = values.detach().flatten().tolist()
    if not isinstance(values, Sequence) or len(values) != 3:
        count = len(values) if isinstance(values, Sequence) else type(values).__name__
        raise ValueError(f"sobel_normalize: expected {name} to hold 3 values (one per RGB channel), got {count}")
    return [float(v) for v in values]


def _check_arguments(images: torch.Tensor, mean: list[float], std: list[float], out_dtype) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"sobel_normalize: expected images to be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            "sobel_normalize: expected images of shape (B, 3, H, W) with 3 RGB channels, got shape "
            f"{tuple(images.shape)}; add a batch dimension to a single image, convert grey or RGBA images to RGB"
        )
    if images.dtype not in _INPUT_DTYPES:
        raise ValueError(
            f"sobel_normalize: expected images of dtype uint8, float32, float16, bfloat16 or float64, "
            f"got {images.dtype}"
        )
    if out_dtype is not None and out_dtype not in _OUTPUT_DTYPES:
        raise ValueError(f"sobel_normalize: expected out_dtype float32, float16, bfloat16 or float64, got {out_dtype}")
    for index, value in enumerate(std):
        if value == 0.0:
            raise ValueError(f"sobel_normalize: std[{index}] is 0, which divides by zero; expected non-zero values")


def sobel_normalize_reference(
    images: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The documented semantics as the plain torch chain: normalize, 1x1 conv (weights 1/3), 3x3 conv."""
    mean_values = _as_floats("mean", mean, images)
    std_values = _as_floats("std", std, images)
    _check_arguments(images, mean_values, std_values, out_dtype)
    x = images.to(compute_dtype)
    if images.dtype == torch.uint8:
        x = x / 255.0
    mean_t = torch.tensor(mean_values, dtype=compute_dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std_values, dtype=compute_dtype, device=images.device).view(1, 3, 1, 1)
    x = (x - mean_t) / std_t
    grey = F.conv2d(x, torch.full((1, 3, 1, 1), 1.0 / 3.0, dtype=compute_dtype, device=images.device))
    out = F.conv2d(grey, _sobel_weight(compute_dtype, images.device), padding=1)
    out = out.to(out_dtype or torch.float32)
    if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def sobel_normalize(
    images: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Fused uint8/float RGB -> normalized grey -> Sobel (Gx, Gy); see the module docstring."""
    mean_values = _as_floats("mean", mean, images)
    std_values = _as_floats("std", std, images)
    _check_arguments(images, mean_values, std_values, out_dtype)
    if not HAS_OPS:
        warn_fallback("sobel_normalize")
        return sobel_normalize_reference(images, mean_values, std_values, out_dtype,
                                         compute_dtype=torch.float64 if images.dtype == torch.float64 else torch.float32)
    return torch.ops.pydc.sobel_normalize(images, mean_values, std_values, out_dtype)


def _channels_last_input(images: torch.Tensor) -> bool:
    return images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()


def _sobel_backward(ctx, grad_output: torch.Tensor):
    """Adjoint of the stem: grad_grey = conv_transpose(grad, [Gx, Gy]); grad_c = grad_grey / (3 std_c)."""
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    compute_dtype = torch.float64 if torch.float64 in (grad_output.dtype, ctx.images_dtype) else torch.float32
    grad = grad_output.to(compute_dtype)
    grad_grey = F.conv_transpose2d(grad, _sobel_weight(compute_dtype, grad.device), padding=1)
    scale = torch.tensor([1.0 / (3.0 * s) for s in ctx.std], dtype=compute_dtype, device=grad.device)
    grad_images = (grad_grey * scale.view(1, 3, 1, 1)).to(ctx.images_dtype)
    if ctx.channels_last:
        grad_images = grad_images.contiguous(memory_format=torch.channels_last)
    return grad_images, None, None, None


def _sobel_setup_context(ctx, inputs, output):
    images, _mean, std, _out_dtype = inputs
    ctx.std = tuple(std)
    ctx.images_dtype = images.dtype
    ctx.channels_last = _channels_last_input(images)


if HAS_OPS:

    @torch.library.register_fake("pydc::sobel_normalize")
    def _sobel_normalize_fake(images, mean, std, out_dtype=None):
        torch._check(images.dim() == 4, lambda: f"sobel_normalize: expected a 4-D (B, 3, H, W) tensor, got {images.dim()}-D")
        torch._check(images.shape[1] == 3, lambda: f"sobel_normalize: expected 3 channels, got {images.shape[1]}")
        torch._check(len(mean) == 3 and len(std) == 3, lambda: "sobel_normalize: mean and std need 3 values each")
        memory_format = torch.channels_last if _channels_last_input(images) else torch.contiguous_format
        batch, _, height, width = images.shape
        return images.new_empty((batch, 2, height, width), dtype=out_dtype or torch.float32).contiguous(
            memory_format=memory_format
        )

    torch.library.register_autograd(
        "pydc::sobel_normalize", _sobel_backward, setup_context=_sobel_setup_context
    )
