"""AlexNet with batch norm and the Sobel stem, as in the original DeepCluster (models/alexnet.py).

Five conv layers (96-256-384-384-256, BN + ReLU, three 3x3/2 max-pools) on the 2-channel Sobel output of a
224x224 crop, then fc6 and fc7 (4096 each, dropout 0.5). The clustering features are fc7 *before* its ReLU,
as the original obtains by dropping the classifier's last ReLU during the feature pass.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pydc.nn import make_stem

# (out_channels, kernel, stride, padding) or "M" for a 3x3 stride-2 max-pool.
ALEXNET_CONVS = [(96, 11, 4, 2), "M", (256, 5, 1, 2), "M", (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1), "M"]


def init_like_deepcluster(module: nn.Module) -> None:
    """The original's initialisation: conv N(0, sqrt(2/fan_out)), BN (1, 0), linear N(0, 0.01), biases 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            fan_out = layer.kernel_size[0] * layer.kernel_size[1] * layer.out_channels
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / fan_out))
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, 0.01)
            nn.init.zeros_(layer.bias)


class AlexNetBody(nn.Module):
    """conv1-conv5 + fc6 + fc7 (no final ReLU); input is the stem's (B, 2, 224, 224)."""

    def __init__(self, in_channels: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for spec in ALEXNET_CONVS:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
                continue
            out_channels, kernel, stride, padding = spec
            layers += [nn.Conv2d(channels, out_channels, kernel, stride, padding), nn.BatchNorm2d(out_channels),
                       nn.ReLU(inplace=True)]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(4096, 4096),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class SobelBackbone(nn.Module):
    """A fixed stem (Sobel by default, or RGB: pydc.nn.make_stem) + a trainable body. `features(images)` gives
    the clustering features. The name stays for the checkpoints and code that know it; the stem has no saved
    state, so a checkpoint's keys are the same for either stem.

    `train_activation` is applied between the features and a classification head during training (ReLU for
    networks whose features are taken before their last ReLU, identity otherwise). Only `body` has
    parameters; `pydc.export` writes `body.state_dict()`.
    """

    def __init__(self, body: nn.Module, feature_dim: int, input_size: int, relu_before_head: bool,
                 stem: nn.Module | None = None):
        super().__init__()
        self.stem = stem if stem is not None else make_stem("sobel")
        self.body = body
        self.feature_dim = feature_dim
        self.input_size = input_size
        self.train_activation = nn.ReLU(inplace=False) if relu_before_head else nn.Identity()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.train_activation(self.features(images))


def alexnet(input_size: int = 224, stem: str = "sobel") -> SobelBackbone:
    if input_size != 224:
        raise ValueError(f"alexnet expects 224x224 crops (its fc6 is sized for a 6x6 map), got --crop {input_size}")
    stem_module = make_stem(stem)
    body = AlexNetBody(in_channels=stem_module.out_channels)
    init_like_deepcluster(body)
    return SobelBackbone(body, feature_dim=4096, input_size=224, relu_before_head=True, stem=stem_module)
