"""ODCMemory beside MMSelfSup's way of running the same memory (torch on the same device, same inputs).

The reference does what odc_memory.py does each step (normalize, blend, scatter, relabel with a matrix
product, change ratio) plus a bincount over the whole label bank for the loss weights, and recomputes
centroids with an argsort of the labels and a Python loop over the classes. pydc keeps counts and
fixed-point class sums up to date inside the sample-update op, so its centroid update reads K x D sums instead
of the N x D bank; the "full recompute" group times pydc's pass over the whole bank as well (odc_class_sums,
what init_memory and load_state_dict run), against the same reference. Before any timing, one cycle runs on
both sides and their banks, labels, loss weights and centroids must agree (_assert_outputs_agree).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import DEVICES, pair_roles, synchronized
from pydc.algorithms.odc import ODCMemory

# CPU: the sizes for this 2-core machine; CUDA: ImageNet (N = 1,281,167, K = 10000, batch 512).
SIZES = {"cpu": dict(length=100_000, classes=1000, dim=256, batch=256),
         "cuda": dict(length=1_281_167, classes=10_000, dim=256, batch=512)}
STEPS_PER_CYCLE = 10


class MMSelfSupStyleMemory:
    """The reference: MMSelfSup's odc_memory.py update rules, in torch on the given device."""

    def __init__(self, feature_bank, label_bank, centroids, momentum=0.5):
        self.feature_bank, self.label_bank = feature_bank.clone(), label_bank.clone()
        self.centroids, self.momentum = centroids.clone(), momentum
        self.num_classes = centroids.shape[0]

    def update_samples(self, indices, features):
        feature_norm = features / (features.norm(dim=1).view(-1, 1) + 1e-10)
        feature_new = (1 - self.momentum) * self.feature_bank[indices] + self.momentum * feature_norm
        feature_norm = feature_new / (feature_new.norm(dim=1).view(-1, 1) + 1e-10)
        self.feature_bank[indices] = feature_norm
        new_labels = torch.mm(self.centroids, feature_norm.t()).argmax(dim=0)
        change_ratio = (new_labels != self.label_bank[indices]).sum().float() / new_labels.shape[0]
        self.label_bank[indices] = new_labels
        return change_ratio.item()

    def loss_weights(self, power=0.5):
        histogram = torch.bincount(self.label_bank, minlength=self.num_classes).float()
        inverse = (1.0 / (histogram + 1e-10)) ** power
        return inverse / inverse.sum()

    def update_centroids(self):
        order = torch.argsort(self.label_bank)
        sorted_labels = self.label_bank[order]
        classes = torch.arange(self.num_classes, device=self.label_bank.device)
        starts = torch.searchsorted(sorted_labels, classes).tolist()
        ends = torch.searchsorted(sorted_labels, classes, right=True).tolist()
        for k, (start, end) in enumerate(zip(starts, ends)):
            if end > start:
                self.centroids[k] = self.feature_bank[order[start:end]].mean(dim=0)


def _setup(device):
    size = SIZES[device]
    generator = torch.Generator(device=device).manual_seed(0)
    features = torch.randn(size["length"], size["dim"], device=device, generator=generator)
    labels = torch.randint(0, size["classes"], (size["length"],), device=device, generator=generator)
    memory = ODCMemory(size["length"], size["dim"], size["classes"], device=device)
    memory.init_memory(features, labels)
    reference = MMSelfSupStyleMemory(memory.feature_bank, memory.label_bank, memory.centroids)
    batches = []
    for _ in range(STEPS_PER_CYCLE):  # distinct indices: MMSelfSup's scatter leaves duplicates undefined
        indices = torch.randperm(size["length"], device=device, generator=generator)[: size["batch"]]
        batches.append((indices, torch.randn(size["batch"], size["dim"], device=device, generator=generator)))
    _assert_outputs_agree(memory, reference, batches)
    return size, memory, reference, batches


def _assert_outputs_agree(memory, reference, batches):
    """Before any timing, one cycle on both sides must give the same memory. Labels come from float32
    products on the reference's side and exact float64 dot products on pydc's: they may differ only at
    near-ties, which random 256-d features make rare (a handful of rows at most)."""
    near_tie_rows = max(2, sum(len(indices) for indices, _ in batches) // 1000)
    for indices, features in batches:
        ours, theirs = memory.update_samples(indices, features), reference.update_samples(indices, features)
        assert abs(ours - theirs) * len(indices) <= near_tie_rows, f"change ratio {ours} vs {theirs}"
    torch.testing.assert_close(memory.feature_bank, reference.feature_bank, rtol=0, atol=1e-6)
    differing = memory.label_bank != reference.label_bank
    assert int(differing.sum()) <= near_tie_rows, f"{int(differing.sum())} labels differ"
    # Classes that a differing row belongs to on either side have different members: compare the others.
    same_members = torch.ones(memory.num_classes, dtype=torch.bool, device=differing.device)
    same_members[memory.label_bank[differing]] = False
    same_members[reference.label_bank[differing]] = False
    if bool(same_members.all()):
        torch.testing.assert_close(memory.loss_weights(), reference.loss_weights(), rtol=1e-5, atol=0)
    memory.update_centroids()
    reference.update_centroids()
    # the reference's float32 means of up to a few hundred unit rows agree with pydc's exact ones to ~1e-7
    comparable = reference.centroids[same_members]
    torch.testing.assert_close(memory.centroids[same_members], comparable, rtol=0, atol=1e-5)
    memory.recount()
    memory.update_centroids()
    torch.testing.assert_close(memory.centroids[same_members], comparable, rtol=0, atol=1e-5)


def _label(device, size, what):
    return (f"odc {what} {device} N{size['length']} K{size['classes']} D{size['dim']} B{size['batch']}")


@pytest.fixture(scope="module", params=DEVICES)
def setup(request):
    return request.param, *_setup(request.param)


@pytest.mark.parametrize("impl", ["pydc", "reference"])
def test_cycle(benchmark, setup, impl):
    device, size, memory, reference, batches = setup
    what = f"cycle ({STEPS_PER_CYCLE} steps + loss weights, 1 centroid update)"
    pair_roles(benchmark, _label(device, size, what), impl,
               "MMSelfSup way (bincount every step, argsort + class loop)")
    target = memory if impl == "pydc" else reference

    def cycle():
        for indices, features in batches:
            target.update_samples(indices, features)
            target.loss_weights()
        target.update_centroids()

    fn = synchronized(cycle, device)
    fn()
    benchmark(fn)


@pytest.mark.parametrize("impl", ["pydc", "reference"])
def test_step(benchmark, setup, impl):
    device, size, memory, reference, batches = setup
    pair_roles(benchmark, _label(device, size, "step (sample update + loss weights)"), impl,
               "MMSelfSup way (bincount every step)")
    target = memory if impl == "pydc" else reference
    indices, features = batches[0]

    def step():
        target.update_samples(indices, features)
        return target.loss_weights()

    fn = synchronized(step, device)
    fn()
    benchmark(fn)


@pytest.mark.parametrize("impl", ["pydc", "reference"])
def test_centroid_update(benchmark, setup, impl):
    device, size, memory, reference, _ = setup
    pair_roles(benchmark, _label(device, size, "centroid update"), impl, "argsort + class loop")
    fn = synchronized(memory.update_centroids if impl == "pydc" else reference.update_centroids, device)
    fn()
    benchmark(fn)


@pytest.mark.parametrize("impl", ["pydc", "reference"])
def test_full_recompute(benchmark, setup, impl):
    device, size, memory, reference, _ = setup
    pair_roles(benchmark, _label(device, size, "centroid recompute from the whole bank"), impl,
               "argsort + class loop")

    def full():
        memory.recount()
        memory.update_centroids()

    fn = synchronized(full if impl == "pydc" else reference.update_centroids, device)
    fn()
    benchmark(fn)
