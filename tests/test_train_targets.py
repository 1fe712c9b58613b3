"""The loss of every training step is computed against the batch's own images' pseudo-labels.

A trainer that pairs each image with another image's label (e.g. `indices.roll(1)`: every image trained on its
neighbour's cluster) still runs, logs finite losses and writes valid assignments, so the end-to-end range checks
of test_train.py cannot see it. Here the algorithm's `loss` and cross-entropy are spied on in a one-epoch
in-process run: the targets handed to cross-entropy must be the labels the algorithm held at that step
(DeepCluster's clustering, ODC's memory label bank) indexed by the batch's image indices.
"""

from __future__ import annotations

import pytest
import torch

import pydc.train
from pydc.algorithms import ALGORITHMS
from tests.test_train import TINY_FLAGS, tiny_data  # noqa: F401 (fixture)

ONE_EPOCH = [flag if flag != "2" else "1" for flag in TINY_FLAGS]


def _labels_now(algorithm) -> torch.Tensor:
    """The labels the algorithm trains on at this step, copied before the step can change them."""
    if algorithm.name == "odc":
        return algorithm.memory.label_bank.detach().clone().cpu()
    return algorithm.labels[0].detach().clone().cpu()  # DeepCluster's (heads, N) labels; one head here


@pytest.mark.parametrize("algo", ["deepcluster", "odc"])
def test_loss_targets_are_the_batch_images_labels(algo, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    algorithm_class = ALGORITHMS[algo]
    real_loss, real_cross_entropy = algorithm_class.loss, torch.nn.functional.cross_entropy
    current, steps = {}, []

    def loss_spy(self, model, batch):
        current.update(labels=_labels_now(self), indices=batch.indices.detach().clone().cpu())
        return real_loss(self, model, batch)

    def cross_entropy_spy(logits, targets, *rest, **kwargs):
        steps.append((targets.detach().clone().cpu(), current.pop("labels"), current.pop("indices")))
        return real_cross_entropy(logits, targets, *rest, **kwargs)

    monkeypatch.setattr(algorithm_class, "loss", loss_spy)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy_spy)
    extra = ["--odc-min-cluster", "4"] if algo == "odc" else []
    assert pydc.train.main(["--algo", algo, "--data", str(tiny_data), "--output", str(tmp_path), "--no-plots",
                            "--no-eval", *extra, *ONE_EPOCH]) == 0

    assert len(steps) == 6  # 72 images, batch 12
    neighbours_differ = False
    for step, (targets, labels, indices) in enumerate(steps):
        torch.testing.assert_close(targets, labels[indices], rtol=0, atol=0, msg=f"step {step}: wrong targets")
        neighbours_differ = neighbours_differ or not torch.equal(labels[indices], labels[indices.roll(1)])
    assert neighbours_differ, "every batch's neighbours share a label: this run could not tell a shifted target"
