"""The bundled demo dataset: scikit-learn's 1797 handwritten digits as a folder of 32x32 RGB PNGs.

The 8x8 images (values 0..16) are scaled to 0..255, upsampled to 32x32 with bilinear interpolation and
repeated over three channels, then written as <root>/<digit>/<sample number>.png. The folder is rendered
once and atomically (pydc.data.rendered).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from pydc.data.cache import cache_dir
from pydc.data.rendered import render_once

IMAGE_SIZE = 32


def digits_folder(root: str | os.PathLike | None = None) -> Path:
    """Path of the rendered digits folder (default <cache>/digits, see pydc.data.cache), rendering it if needed."""
    target = Path(root).expanduser() if root is not None else cache_dir() / "digits"
    return render_once(target, _render, "digits")


def _render(folder: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in range(10):
        (folder / str(digit)).mkdir()
    for number, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        grey = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
        grey = grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        grey.convert("RGB").save(folder / str(label) / f"{number:04d}.png", optimize=False)
