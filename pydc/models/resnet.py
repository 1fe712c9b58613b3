"""torchvision's ResNet-50 with a 2-channel first convolution behind the Sobel stem.

The body *is* a torchvision ResNet-50 (same parameter names) with conv1 taking 2 channels and fc replaced by
an identity, so its features are the 2048-d globally pooled output and an exported state_dict loads into
`torchvision.models.resnet50()` after the same two changes.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet50 as torchvision_resnet50

from pydc.models.alexnet import SobelBackbone
from pydc.nn import make_stem


def resnet50(input_size: int = 224, stem: str = "sobel") -> SobelBackbone:
    stem_module = make_stem(stem)
    body = torchvision_resnet50(weights=None)
    body.conv1 = nn.Conv2d(stem_module.out_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(body.conv1.weight, mode="fan_out", nonlinearity="relu")
    body.fc = nn.Identity()
    return SobelBackbone(body, feature_dim=2048, input_size=input_size, relu_before_head=False, stem=stem_module)
