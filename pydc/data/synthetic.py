"""Synthetic but photo-like JPEGs for throughput benchmarks, made without any external data.

Each image is a smooth two-colour gradient background, a low-frequency texture (a few summed sinusoids
with random orientation, like cloth or water), a handful of soft-edged ellipses and rectangles, and mild
sensor-like noise, saved at JPEG quality 90. Files come out at tens of kilobytes for 500x375, like
photographs of that size, so the decoder does realistic work (pure noise would be several times larger
and slower to decode; flat colours much faster).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def synthetic_jpegs(root: str | os.PathLike, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[Path]:
    """Write `n` JPEGs of `size` = (width, height) into `root` (created if needed); return their paths."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for number in range(n):
        path = root / f"synthetic_{number:06d}.jpg"
        _render(rng, size).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def _render(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    width, height = size
    # Background and texture are low-frequency: compute them at a quarter of the resolution and let a
    # bicubic upsampling smooth them, which is also what keeps this fast enough for hundreds of images.
    small_w, small_h = max(width // 4, 2), max(height // 4, 2)
    y, x = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    start, end = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.float32(np.cos(angle)) * x / small_w + np.float32(np.sin(angle)) * y / small_h
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    background = start + (end - start) * ramp[..., None]
    texture = np.zeros((small_h, small_w), dtype=np.float32)
    for _ in range(4):
        direction = rng.uniform(0, 2 * np.pi)
        frequency = rng.uniform(0.04, 0.6)  # cycles per quarter-resolution pixel * 2 pi
        phase = np.float32(frequency * np.cos(direction)) * x + np.float32(frequency * np.sin(direction)) * y
        texture += np.sin(phase + np.float32(rng.uniform(0, 6.3)))
    background += np.float32(rng.uniform(4, 16)) * texture[..., None]
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)

    shapes = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shapes)
    for _ in range(rng.integers(3, 8)):
        x0, x1 = sorted(rng.integers(0, width, size=2))
        y0, y1 = sorted(rng.integers(0, height, size=2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3)) + (int(rng.integers(120, 256)),)
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1 + 4, y1 + 4), fill=colour)
        else:
            draw.rectangle((x0, y0, x1 + 4, y1 + 4), fill=colour)
    shapes = shapes.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 1.5))))
    canvas.paste(shapes, (0, 0), shapes)

    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * np.float32(2.0)
    pixels = np.asarray(canvas, dtype=np.float32) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
