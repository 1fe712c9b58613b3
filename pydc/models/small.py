"""A small conv net for the bundled 32x32 digits, sized to train in minutes on a laptop CPU.

Sobel stem -> five 3x3 conv layers (BN + ReLU; widths w, w, 2w, 2w, 4w with w = 16, two 2x2 max-pools) -> global
average pool -> fc (4w -> 256) + BN. The clustering features are that fc's output before a ReLU, the same
place as AlexNet's fc7.
"""

from __future__ import annotations

import torch
from torch import nn

from pydc.models.alexnet import SobelBackbone
from pydc.nn import make_stem

FEATURE_DIM = 256


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


class SmallBody(nn.Module):
    def __init__(self, width: int = 16, in_channels: int = 2, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width), *_conv_bn_relu(width, width), nn.MaxPool2d(2),
            *_conv_bn_relu(width, 2 * width), *_conv_bn_relu(2 * width, 2 * width), nn.MaxPool2d(2),
            *_conv_bn_relu(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Linear(4 * width, feature_dim), nn.BatchNorm1d(feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def small(input_size: int = 32, stem: str = "sobel") -> SobelBackbone:
    if input_size < 8:
        raise ValueError(f"small expects crops of at least 8x8 pixels (two 2x2 pools), got --crop {input_size}")
    stem_module = make_stem(stem)
    return SobelBackbone(SmallBody(in_channels=stem_module.out_channels), feature_dim=FEATURE_DIM,
                         input_size=input_size, relu_before_head=True, stem=stem_module)
