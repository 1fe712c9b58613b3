"""RGBStem: the plain colour stem, torchvision's Normalize, for algorithms defined on RGB (DeepCluster-v2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pydc.ops.sobel import IMAGENET_MEAN, IMAGENET_STD


class RGBStem(nn.Module):
    """(B, 3, H, W) uint8 (scaled by 1/255) or floating images -> (B, 3, H, W) float32, (x - mean_c) / std_c.

    Like SobelStem it has no parameters (mean and std are buffers that are not saved, so a checkpoint's keys do
    not depend on the stem).
    """

    out_channels = 3

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"RGBStem: expected 3 mean and 3 std values, got {len(mean)} and {len(std)}")
        if any(float(s) == 0.0 for s in std):
            raise ValueError(f"RGBStem: std must be non-zero, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"RGBStem: expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return (x - self.mean) / self.std


STEM_NAMES = ("sobel", "rgb")


def make_stem(name: str) -> nn.Module:
    """The stem called `name`: "sobel" (grey + Sobel, 2 channels) or "rgb" (Normalize, 3 channels)."""
    from pydc.nn.sobel import SobelStem

    stems = {"sobel": SobelStem, "rgb": RGBStem}
    if name not in stems:
        raise ValueError(f"unknown stem {name!r}; expected one of {', '.join(STEM_NAMES)}")
    return stems[name]()
