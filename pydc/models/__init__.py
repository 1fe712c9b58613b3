"""Backbones behind a fixed stem (Sobel by default, RGB with stem="rgb"): AlexNet-BN, VGG16-BN, ResNet-50 and a
small CPU-sized net.

`build_model(arch, input_size, stem)` returns a `SobelBackbone`: `features(uint8 images)` gives the clustering features
(fc7 before its ReLU for AlexNet/VGG and the small net, the pooled 2048-d output for ResNet-50), `forward`
adds the activation a classification head expects, `feature_dim` says the feature size.
"""

from __future__ import annotations

from pydc.models.alexnet import SobelBackbone, alexnet
from pydc.models.resnet import resnet50
from pydc.models.small import FEATURE_DIM as SMALL_FEATURE_DIM, small
from pydc.models.vgg import vgg16

ARCHITECTURES = {"small": small, "alexnet": alexnet, "vgg16": vgg16, "resnet50": resnet50}

# The crop each architecture is built for; `small` is sized for the bundled 32x32 digits.
DEFAULT_INPUT_SIZE = {"small": 32, "alexnet": 224, "vgg16": 224, "resnet50": 224}
# The width of `features()` (SobelBackbone.feature_dim), known before a model is built.
FEATURE_DIM = {"small": SMALL_FEATURE_DIM, "alexnet": 4096, "vgg16": 4096, "resnet50": 2048}


def build_model(arch: str, input_size: int | None = None, stem: str = "sobel") -> SobelBackbone:
    """The backbone named `arch` (one of ARCHITECTURES) for square crops of `input_size` pixels, behind the stem
    named `stem` ("sobel": grey + Sobel, 2 channels into the body; "rgb": Normalize, 3 channels)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](input_size or DEFAULT_INPUT_SIZE[arch], stem=stem)


__all__ = ["ARCHITECTURES", "DEFAULT_INPUT_SIZE", "FEATURE_DIM", "SobelBackbone", "build_model"]
