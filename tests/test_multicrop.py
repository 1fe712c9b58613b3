"""Multi-crop training batches, colour distortion and the RGB stem (what DeepCluster-v2 adds to data and models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from pydc.data import TrainLoader
from pydc.data.color import color_distortion
from pydc.data.geometry import CropView, random_resized_crops
from pydc.data.torchvision_backend import train_transform
from tests.test_data_loaders import _write_pngs, needs_dali

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*image decoding and encoding capabilities of TorchVision are deprecated:DeprecationWarning")

VIEWS = (CropView(24, (0.3, 1.0)), CropView(24, (0.3, 1.0)), CropView(12, (0.1, 0.3)), CropView(12, (0.1, 0.3)))


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    sizes = [(40, 48), (48, 40), (37, 53), (64, 30), (33, 33), (50, 45), (29, 61), (45, 45)] * 2
    return _write_pngs(tmp_path_factory.mktemp("multicrop"), sizes)


def _expected_view(index, position_in_epoch, indices, view_number, view, seed=3, epoch=2, batch_size=5):
    """The crop a view must hold, cut from the decoded file with the documented windows."""
    from PIL import Image

    batch_number, row = divmod(position_in_epoch, batch_size)
    batch_indices = indices[batch_number * batch_size:(batch_number + 1) * batch_size]
    images = [torch.from_numpy(np.array(Image.open(index.paths[i]).convert("RGB"))).permute(2, 0, 1)
              for i in batch_indices]
    windows = random_resized_crops([im.shape[1] for im in images], [im.shape[2] for im in images], seed, epoch,
                                   batch_number, view.scale, view=view_number)
    return train_transform(images[row], windows, row, view.size)


@pytest.mark.parametrize("cache_in_memory", [False, True])
def test_views_are_the_documented_crops_of_each_image(index, cache_in_memory):
    loader = TrainLoader(index, 24, 5, backend="torchvision", seed=3, views=VIEWS, cache_in_memory=cache_in_memory)
    loader.set_epoch(2)
    order = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 7]
    loader.set_order(order)
    batches = list(loader)
    assert [len(b.indices) for b in batches] == [5, 5, 1]
    for batch in batches:
        assert len(batch.views) == len(VIEWS) and batch.images is batch.views[0]
        assert [tuple(v.shape[-2:]) for v in batch.views] == [(24, 24), (24, 24), (12, 12), (12, 12)]
    position = 0
    for batch in batches:
        for row in range(len(batch.indices)):
            for number, view in enumerate(VIEWS):
                expected = _expected_view(index, position, order, number, view)
                torch.testing.assert_close(batch.views[number][row], expected, rtol=0, atol=0)
            position += 1
    # The two large views of an image are different crops.
    assert not torch.equal(batches[0].views[0], batches[0].views[1])


def test_first_view_is_the_single_crop_batch(index):
    single = TrainLoader(index, 24, 4, backend="torchvision", seed=1, crop_scale=(0.3, 1.0), cache_in_memory=False)
    multi = TrainLoader(index, 24, 4, backend="torchvision", seed=1, views=VIEWS, cache_in_memory=False)
    for loader in (single, multi):
        loader.set_epoch(1)
        loader.set_order(list(range(12)))
    for a, b in zip(single, multi):
        assert a.views is None
        assert torch.equal(a.images, b.views[0])


def test_views_reject_bad_specs(index):
    with pytest.raises(ValueError, match="CropView"):
        TrainLoader(index, 24, 4, views=[(24, (0.1, 1.0))])
    with pytest.raises(ValueError, match="scale"):
        TrainLoader(index, 24, 4, views=[CropView(24, (0.5, 0.2))])
    with pytest.raises(ValueError, match="size"):
        TrainLoader(index, 24, 4, views=[CropView(0, (0.1, 1.0))])


@needs_dali
def test_dali_cuts_the_same_views(index):
    loaders = [TrainLoader(index, 24, 5, backend=backend, seed=3, views=VIEWS, cache_in_memory=False)
               for backend in ("torchvision", "dali")]
    for loader in loaders:
        loader.set_order(list(range(10)))
    for a, b in zip(*loaders):
        for view_a, view_b in zip(a.views, b.views):
            assert (view_a.float() - view_b.float()).abs().mean() < 2.0


def test_color_distortion_is_seeded_and_changes_only_chosen_images():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    first = color_distortion(images, np.random.default_rng(5))
    assert first.dtype == torch.uint8 and first.shape == images.shape
    assert torch.equal(first, color_distortion(images, np.random.default_rng(5)))
    rng = np.random.default_rng(5)
    jitter = rng.random(64) < 0.8
    rng.uniform(size=(3, 64)), rng.uniform(size=64)
    grayscale = rng.random(64) < 0.2
    untouched = ~jitter & ~grayscale
    assert untouched.any() and (~untouched).any()
    assert torch.equal(first[torch.from_numpy(untouched)], images[torch.from_numpy(untouched)])
    gray = first[torch.from_numpy(grayscale)]
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    changed = first[torch.from_numpy(jitter & ~grayscale)]
    assert not torch.equal(changed, images[torch.from_numpy(jitter & ~grayscale)])


def test_color_jitter_matches_torchvision_per_adjustment():
    # With one factor at a time, each adjustment equals torchvision's (up to uint8 rounding of the two paths).
    from pydc.data import color

    images = torch.randint(0, 256, (6, 3, 10, 10), dtype=torch.uint8)
    x = images.float() / 255
    hue = torch.tensor([0.1, -0.15, 0.05, 0.2, -0.2, 0.0]).view(-1, 1, 1, 1)
    ours = color._shift_hue(x, hue)
    for i in range(6):
        theirs = TF.adjust_hue(x[i], float(hue[i]))
        torch.testing.assert_close(ours[i], theirs, atol=2e-3, rtol=0)
    factor = torch.tensor([0.3, 1.7, 1.0, 0.5, 1.2, 0.9]).view(-1, 1, 1, 1)
    saturated = color._blend(x.clone(), color._gray(x), factor)
    contrasted = color._blend(x.clone(), color._gray(x).mean(dim=(2, 3), keepdim=True), factor)
    for i in range(6):
        torch.testing.assert_close(saturated[i], TF.adjust_saturation(x[i], float(factor[i])), atol=2e-3, rtol=0)
        torch.testing.assert_close(contrasted[i], TF.adjust_contrast(x[i], float(factor[i])), atol=2e-3, rtol=0)


def test_loader_color_distortion_is_reproducible_and_per_view(index):
    def epoch(color):
        loader = TrainLoader(index, 24, 4, backend="torchvision", seed=2, views=VIEWS[:2], color_distortion=color,
                             cache_in_memory=True)
        loader.set_order(list(range(8)))
        return [b.views for b in loader]

    plain, first, second = epoch(False), epoch(True), epoch(True)
    for p, a, b in zip(plain, first, second):
        for view_p, view_a, view_b in zip(p, a, b):
            assert torch.equal(view_a, view_b)
        assert not all(torch.equal(x, y) for x, y in zip(p, a))


def test_loader_color_distortion_strength_is_swavs_s(index):
    # A float strength s is SwAV's get_color_distortion(s): each view equals the undistorted view through
    # color_distortion(view, that view's generator, s); True is s = 1 and 0 is no distortion at all.
    def epoch(color):
        loader = TrainLoader(index, 24, 4, backend="torchvision", seed=2, views=VIEWS[:2], color_distortion=color,
                             cache_in_memory=True)
        loader.set_order(list(range(8)))
        loader.set_epoch(1)
        return [(b.number, b.views) for b in loader]

    plain, half, full, swav = epoch(0.0), epoch(0.5), epoch(True), epoch(1.0)
    for (number, p), (_, h), (_, f), (_, s) in zip(plain, half, full, swav):
        for view_number, (view_p, view_h, view_f, view_s) in enumerate(zip(p, h, f, s)):
            rng = [2, 1, number, view_number, 1]
            assert torch.equal(view_h, color_distortion(view_p, np.random.default_rng(rng), 0.5))
            assert torch.equal(view_f, color_distortion(view_p, np.random.default_rng(rng), 1.0))
            assert torch.equal(view_f, view_s)
    assert not all(torch.equal(x, y) for (_, h), (_, f) in zip(half, full) for x, y in zip(h, f))


@pytest.mark.parametrize("strength", [-0.5, float("nan"), float("inf")])
def test_loader_refuses_a_bad_color_strength(index, strength):
    with pytest.raises(ValueError, match="color_distortion must be a finite strength >= 0"):
        TrainLoader(index, 24, 4, backend="torchvision", views=VIEWS[:2], color_distortion=strength)
