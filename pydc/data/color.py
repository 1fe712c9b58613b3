"""Colour distortion of training crops, as SwAV / DeepCluster-v2 use it, on whole uint8 batches on any device.

`color_distortion(images, rng, strength)`: with probability 0.8 per image, colour jitter (brightness, contrast,
saturation by factors drawn from [max(0, 1 - 0.8 s), 1 + 0.8 s], hue shifted by [-0.2 s, 0.2 s] of a turn),
then with probability 0.2 per image, grayscale (three equal channels), as SwAV's get_color_distortion(s). One
difference: torchvision's ColorJitter applies the four adjustments in a random order per call; here the order
is fixed (brightness, contrast, saturation, hue), so that a batch is one vectorised computation. The draws come
from the given numpy generator, so a batch is reproduced exactly by its seed (see pydc.data.loaders).
"""

from __future__ import annotations

import numpy as np
import torch

JITTER_PROBABILITY = 0.8
GRAYSCALE_PROBABILITY = 0.2
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _gray(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1.0 - factor) * other).clamp_(0.0, 1.0)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, hue + shift (in turns), -> RGB, per image."""
    maximum, _ = x.max(dim=1, keepdim=True)
    minimum, _ = x.min(dim=1, keepdim=True)
    delta = maximum - minimum
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    hue = torch.where(maximum == r, ((g - b) / safe_delta) % 6.0,
                      torch.where(maximum == g, (b - r) / safe_delta + 2.0, (r - g) / safe_delta + 4.0)) / 6.0
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    hue = (hue + shift) % 1.0
    saturation = torch.where(maximum > 0, delta / torch.where(maximum > 0, maximum, torch.ones_like(maximum)),
                             torch.zeros_like(maximum))
    # HSV -> RGB: channel n takes v - v s max(0, min(k, 4 - k, 1)) with k = (n + 6 h) mod 6, n = 5, 3, 1.
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = (offsets + hue * 6.0) % 6.0
    weight = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return maximum - maximum * saturation * weight


def color_distortion(images: torch.Tensor, rng: np.random.Generator, strength: float = 1.0) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, H, W): SwAV's colour distortion (module docstring), per image."""
    if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"color_distortion: expected uint8 images of shape (B, 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    count = images.shape[0]
    jitter = rng.random(count) < JITTER_PROBABILITY
    low, high = max(0.0, 1.0 - 0.8 * strength), 1.0 + 0.8 * strength
    factors = rng.uniform(low, high, size=(3, count))
    hue_shift = rng.uniform(-0.2 * strength, 0.2 * strength, size=count)
    grayscale = rng.random(count) < GRAYSCALE_PROBABILITY
    factors[:, ~jitter] = 1.0
    hue_shift[~jitter] = 0.0

    def per_image(values) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32, device=images.device).view(-1, 1, 1, 1)

    x = images.float() / 255.0
    x = (x * per_image(factors[0])).clamp_(0.0, 1.0)
    x = _blend(x, _gray(x).mean(dim=(2, 3), keepdim=True), per_image(factors[1]))
    x = _blend(x, _gray(x), per_image(factors[2]))
    if jitter.any():
        x = torch.where(per_image(jitter) > 0, _shift_hue(x, per_image(hue_shift)), x)
    x = torch.where(per_image(grayscale) > 0, _gray(x).expand_as(x), x)
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)
