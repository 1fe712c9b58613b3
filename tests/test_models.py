"""Backbones: feature shapes and where the features are taken, the stem in front, export round trips."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pydc.algorithms.deepcluster import DeepClusterModel
from pydc.algorithms.odc_model import ODCModel
from pydc.models import build_model
from pydc.nn import SobelStem
from pydc.ops.sobel import sobel_normalize_reference
from tests.conftest import random_images

FEATURE_DIMS = {"small": 256, "alexnet": 4096, "vgg16": 4096, "resnet50": 2048}


@pytest.mark.parametrize("arch", ["small", "alexnet", "resnet50",
                                  pytest.param("vgg16", marks=pytest.mark.slow)])
def test_features_shape_and_training_forward(arch):
    model = build_model(arch)
    size = model.input_size
    images = random_images((2, 3, size, size), torch.uint8)
    model.eval()
    with torch.no_grad():
        features = model.features(images)
    assert features.shape == (2, FEATURE_DIMS[arch]) == (2, model.feature_dim)
    assert features.dtype == torch.float32 and torch.isfinite(features).all()
    model.train()
    out = model(images)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["small", "alexnet"])
def test_features_are_taken_before_the_last_relu(arch):
    """fc7 before its ReLU (as the original drops the last ReLU for the feature pass): features go negative,
    and the training forward is exactly their ReLU."""
    model = build_model(arch).eval()
    images = random_images((4, 3, model.input_size, model.input_size), torch.uint8)
    with torch.no_grad():
        features = model.features(images)
        trained_view = model(images)
    assert (features < 0).any()
    torch.testing.assert_close(trained_view, torch.relu(features))


def test_every_model_starts_with_the_fused_sobel_stem():
    model = build_model("small").eval()
    assert isinstance(model.stem, SobelStem)
    assert next(model.body.parameters()).shape[1] == 2  # the first conv sees the 2 Sobel channels
    images = random_images((2, 3, 32, 32), torch.uint8)
    with torch.no_grad():
        expected = model.body(sobel_normalize_reference(images))
        torch.testing.assert_close(model.features(images), expected, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in model.stem.parameters()) == 0


def test_unknown_arch_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="unknown architecture 'resnet18'.*small, alexnet, vgg16, resnet50"):
        build_model("resnet18")


@pytest.mark.parametrize("arch", ["alexnet", "vgg16"])
def test_fc_sized_archs_reject_other_crops(arch):
    with pytest.raises(ValueError, match="224"):
        build_model(arch, 160)


def test_resnet50_body_loads_into_torchvision():
    """The export contract: the body's state_dict loads into torchvision's ResNet-50 with a 2-channel conv1."""
    body_state = build_model("resnet50").body.state_dict()
    net = torchvision.models.resnet50()
    net.conv1 = nn.Conv2d(2, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    net.load_state_dict(body_state)  # strict


def test_deepcluster_top_layer_reset_is_seeded_and_in_place():
    model = DeepClusterModel(build_model("small"), num_clusters=7)
    weight = model.top_layer.weight
    model.reset_top_layer(seed=3, epoch=1)
    first = weight.detach().clone()
    assert model.top_layer.weight is weight  # DDP keeps its view of the parameter
    assert torch.all(model.top_layer.bias == 0)
    assert 0.005 < float(first.std()) < 0.015
    model.reset_top_layer(seed=3, epoch=2)
    assert not torch.equal(first, model.top_layer.weight)
    model.reset_top_layer(seed=3, epoch=1)
    assert torch.equal(first, model.top_layer.weight)


@pytest.mark.parametrize("arch", ["small", "resnet50"])
def test_odc_model_neck_dims_follow_the_backbone(arch):
    model = ODCModel(build_model(arch), num_clusters=11)
    assert model.neck.fc0.in_features == FEATURE_DIMS[arch]
    model.train()
    features, logits = model(random_images((3, 3, model.backbone.input_size, model.backbone.input_size),
                                           torch.uint8))
    assert features.shape == (3, 256) and logits.shape == (3, 11)
    assert (features >= 0).all()  # the neck ends with a ReLU


@pytest.mark.parametrize("arch", ["small", "resnet50"])
def test_rgb_stem_feeds_three_channels_and_keeps_checkpoint_keys(arch):
    from pydc.models import build_model
    from pydc.nn import RGBStem, SobelStem

    sobel, rgb = build_model(arch, stem="sobel"), build_model(arch, stem="rgb")
    assert isinstance(sobel.stem, SobelStem) and isinstance(rgb.stem, RGBStem)
    assert set(sobel.state_dict()) == set(rgb.state_dict())  # the stems save nothing
    size = rgb.input_size
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(rgb.stem(images), expected)
    rgb.eval()
    assert rgb.features(images).shape == (2, rgb.feature_dim)
    with pytest.raises(ValueError, match="unknown stem 'hsv'"):
        build_model(arch, stem="hsv")


def test_feature_dim_table_matches_the_built_backbones():
    """--pca-dim's default is read from FEATURE_DIM before any model is built: it must be what each builds."""
    from pydc.models import ARCHITECTURES, FEATURE_DIM, build_model

    assert {arch: build_model(arch).feature_dim for arch in ARCHITECTURES} == FEATURE_DIM
