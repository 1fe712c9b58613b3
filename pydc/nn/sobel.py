"""SobelStem: DeepCluster's fixed first layer, as one fused op."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pydc.ops.sobel import IMAGENET_MEAN, IMAGENET_STD, sobel_normalize


class SobelStem(nn.Module):
    """Normalize(mean, std) -> grey -> Sobel (Gx, Gy), the stem of DeepCluster's backbones.

    Takes (B, 3, H, W) images, uint8 (scaled by 1/255) or floating, and returns (B, 2, H, W). The stem has
    no parameters and is never trained; mean and std are plain floats so that torch.compile sees them as
    constants.
    """

    out_channels = 2

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 out_dtype: torch.dtype | None = None):
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"SobelStem: expected 3 mean and 3 std values, got {len(mean)} and {len(std)}")
        if any(float(s) == 0.0 for s in std):
            raise ValueError(f"SobelStem: std must be non-zero, got {tuple(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.out_dtype = out_dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return sobel_normalize(images, self.mean, self.std, self.out_dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}, out_dtype={self.out_dtype}"
