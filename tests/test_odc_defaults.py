"""ODC's own options reach the algorithm, and the mechanisms behind them do what their help says."""

from __future__ import annotations

import math

import pytest
import torch

from pydc.algorithms.odc import ODC
from pydc.algorithms.odc_model import ODCModel, init_linear
from pydc.models import build_model
from pydc.utils.options import parse_args


def _linear_layers(model: ODCModel) -> dict:
    return {"fc0": model.neck.fc0, "fc1": model.neck.fc1, "head": model.head}


def _looks_initialised(layer: torch.nn.Linear, init: str) -> bool:
    """N(0, 0.01) weights and zero biases (mmselfsup), or PyTorch's Kaiming-uniform: |w| <= 1/sqrt(fan_in),
    std 1/sqrt(3 fan_in), biases in the same bound and not all zero (torch)."""
    weight, bias = layer.weight.detach(), layer.bias.detach()
    if init == "mmselfsup":
        return math.isclose(float(weight.std()), 0.01, rel_tol=0.1) and bool((bias == 0).all())
    bound = 1.0 / math.sqrt(layer.in_features)
    return (float(weight.abs().max()) <= bound and math.isclose(float(weight.std()), bound / math.sqrt(3), rel_tol=0.1)
            and bool((bias != 0).any()) and float(bias.abs().max()) <= bound)


@pytest.mark.parametrize("init", ["mmselfsup", "torch"])
def test_linear_init_sets_every_linear_layer_of_the_neck_and_head(init):
    torch.manual_seed(0)
    model = ODCModel(build_model("small", 16), num_clusters=40, init=init)
    for name, layer in _linear_layers(model).items():
        assert _looks_initialised(layer, init), name
        assert not _looks_initialised(layer, "torch" if init == "mmselfsup" else "mmselfsup"), name


def test_linear_init_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="expected one of"):
        init_linear(torch.nn.Linear(4, 4), "xavier")


@pytest.mark.parametrize("init", ["mmselfsup", "torch"])
def test_linear_init_option_reaches_the_model(init):
    args = parse_args(["--algo", "odc", "--k", "40", "--odc-linear-init", init, "--device", "cpu"])
    args.odc_min_cluster = 1
    algorithm = ODC(args, num_images=100, device=torch.device("cpu"))
    torch.manual_seed(0)
    model, _, _ = algorithm.build(build_model("small", 16))
    for name, layer in _linear_layers(model).items():
        assert _looks_initialised(layer, init), name


def test_linear_init_default_is_mmselfsup_and_reaches_the_model():
    # Not changed by issue 14: `torch` helped the digits on average but not beyond the seed spread, and not the
    # other sets (notes/d14-odc.md); the default stays the reference's.
    args = parse_args(["--algo", "odc", "--k", "40", "--device", "cpu"])
    assert args.odc_linear_init == "mmselfsup"
    args.odc_min_cluster = 1
    torch.manual_seed(0)
    model, _, _ = ODC(args, num_images=100, device=torch.device("cpu")).build(build_model("small", 16))
    assert all(_looks_initialised(layer, "mmselfsup") for layer in _linear_layers(model).values())


def test_epoch_record_counts_the_clusters_refilled_by_the_steps():
    args = parse_args(["--algo", "odc", "--k", "3", "--device", "cpu", "--odc-centroid-interval", "1"])
    args.odc_min_cluster = 3
    algorithm = ODC(args, num_images=12, device=torch.device("cpu"))
    algorithm.build(build_model("small", 16))
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(12, algorithm.model.feature_dim, generator=generator)
    labels = torch.tensor([0] * 6 + [1] * 5 + [2])  # class 2 has 1 member < 3: dissolved and refilled
    algorithm.memory.init_memory(features, labels)
    totals = {"steps": 0}
    for step in (1, 2):
        batch = torch.tensor([step, 11 - step])
        algorithm._step_indices, algorithm._step_features = batch, features[batch] + 0.01
        part = algorithm.after_step(step)
        totals = {key: totals.get(key, 0) + part.get(key, 0) for key in {*totals, *part}}
        totals["steps"] = step
        if step == 1:
            assert part["clusters_refilled"] == 1
    assert int((algorithm.memory.counts < 3).sum()) == 0
    record = algorithm.epoch_record(totals)
    assert record["clusters_refilled"] == totals["clusters_refilled"] >= 1
    assert 0.0 <= record["change_ratio"] <= 1.0
