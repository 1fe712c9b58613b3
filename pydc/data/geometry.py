"""Crop geometry shared by both backends, so that DALI and torchvision cut the same windows.

Feature pass: resize the shorter side to `resize_size(size)` = int(size * 256 / 224) (torchvision's
Resize(256) + CenterCrop(224) scaled to `size`), then take the centred size x size window.

Training: torchvision's RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) window rule (up to ten
draws of area fraction and log aspect ratio; the first that fits is used, else a centre crop with the ratio
clamped), then a horizontal flip with probability 1/2. The random numbers come from numpy's default
generator (PCG64) seeded by (seed, epoch, batch number), drawn for a whole batch at once: the windows depend
only on those and the image sizes, not on thread counts, backend or device. Multi-crop: crop view v > 0 of a
batch draws from (seed, epoch, batch number, v); view 0 draws exactly as a single-crop batch does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
TRIES = 10


def resize_size(size: int) -> int:
    """Shorter-side length before the feature pass's centre crop (256 for size 224)."""
    return int(size * 256 / 224)


def feature_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(resized height, resized width, crop top, crop left) of the feature pass, with torchvision's rounding.

    Resize(shorter side) keeps the long side as int(short_target * long / short); CenterCrop puts the window at
    int(round((resized - size) / 2)). Both backends use these numbers so their windows are identical.
    """
    short_target = resize_size(size)
    if height <= width:
        resized_h, resized_w = short_target, int(short_target * width / height)
    else:
        resized_h, resized_w = int(short_target * height / width), short_target
    return resized_h, resized_w, int(round((resized_h - size) / 2.0)), int(round((resized_w - size) / 2.0))


@dataclass(frozen=True)
class CropView:
    """One crop of a multi-crop training batch: RandomResizedCrop to `size` with area fraction in `scale`."""

    size: int
    scale: tuple[float, float] = SCALE


@dataclass(frozen=True)
class CropWindows:
    """Per-sample crop windows in pixels of the decoded image, and flips."""

    top: np.ndarray  # int64 (B,)
    left: np.ndarray  # int64 (B,)
    height: np.ndarray  # int64 (B,)
    width: np.ndarray  # int64 (B,)
    flip: np.ndarray  # bool (B,)

    def select(self, rows) -> "CropWindows":
        """The windows of the given rows (an index array or boolean mask)."""
        return CropWindows(self.top[rows], self.left[rows], self.height[rows], self.width[rows], self.flip[rows])


def random_resized_crops(heights, widths, seed: int, epoch: int, batch_number: int,
                         scale: tuple[float, float] = SCALE, view: int = 0) -> CropWindows:
    """RandomResizedCrop windows and flips for a batch of images of the given sizes.

    `scale` is the range of the crop's area fraction (torchvision's default (0.08, 1)); `view` numbers the crop
    of a multi-crop batch (each view draws its own windows).
    """
    heights = np.asarray(heights, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    count = len(heights)
    rng = np.random.default_rng([seed, epoch, batch_number] + ([view] if view else []))
    area_fraction = rng.uniform(scale[0], scale[1], size=(count, TRIES))
    log_ratio = rng.uniform(math.log(RATIO[0]), math.log(RATIO[1]), size=(count, TRIES))
    top_u = rng.random((count, TRIES))
    left_u = rng.random((count, TRIES))
    flip = rng.random(count) < 0.5

    area = (heights * widths)[:, None] * area_fraction
    aspect = np.exp(log_ratio)
    crop_w = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    crop_h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= widths[:, None]) & (crop_h <= heights[:, None])
    first = np.argmax(fits, axis=1)
    found = fits[np.arange(count), first]
    rows = np.arange(count)
    height = crop_h[rows, first]
    width = crop_w[rows, first]
    top = np.floor(top_u[rows, first] * (heights - height + 1)).astype(np.int64)
    left = np.floor(left_u[rows, first] * (widths - width + 1)).astype(np.int64)

    # No draw fitted: the whole image, cut to the nearest allowed aspect ratio, centred (torchvision's rule).
    if not found.all():
        fallback = ~found
        in_ratio = widths / heights
        fb_w, fb_h = widths.copy(), heights.copy()
        narrow = in_ratio < RATIO[0]
        wide = in_ratio > RATIO[1]
        fb_h[narrow] = np.rint(widths[narrow] / RATIO[0]).astype(np.int64)
        fb_w[wide] = np.rint(heights[wide] * RATIO[1]).astype(np.int64)
        height = np.where(fallback, fb_h, height)
        width = np.where(fallback, fb_w, width)
        top = np.where(fallback, (heights - fb_h) // 2, top)
        left = np.where(fallback, (widths - fb_w) // 2, left)
    return CropWindows(top=top, left=left, height=height, width=width, flip=flip)
