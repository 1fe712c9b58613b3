"""VGG16 with batch norm and the Sobel stem, as in the original DeepCluster (models/vgg16.py).

Thirteen 3x3 conv layers with BN + ReLU and five max-pools on the 2-channel Sobel output of a 224x224 crop,
then fc6/fc7 (4096 each). Clustering features: fc7 before its ReLU.
"""

from __future__ import annotations

import torch
from torch import nn

from pydc.models.alexnet import SobelBackbone, init_like_deepcluster
from pydc.nn import make_stem

VGG16_CONVS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16Body(nn.Module):
    def __init__(self, in_channels: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for spec in VGG16_CONVS:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers += [nn.Conv2d(channels, spec, 3, padding=1), nn.BatchNorm2d(spec), nn.ReLU(inplace=True)]
            channels = spec
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(4096, 4096),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16(input_size: int = 224, stem: str = "sobel") -> SobelBackbone:
    if input_size != 224:
        raise ValueError(f"vgg16 expects 224x224 crops (its fc6 is sized for a 7x7 map), got --crop {input_size}")
    stem_module = make_stem(stem)
    body = VGG16Body(in_channels=stem_module.out_channels)
    init_like_deepcluster(body)
    return SobelBackbone(body, feature_dim=4096, input_size=224, relu_before_head=True, stem=stem_module)
