"""The bundled demo dataset: scikit-learn's 1797 handwritten digits as a folder of 32x32 RGB PNGs.

The 8x8 images (values 0..16) are scaled to 0..255, upsampled to 32x32 with bilinear interpolation and
repeated over three channels, then written as <root>/<digit>/<sample number>.png. The folder is rendered
once: into a temporary sibling folder (".<name>-XXXX") that is renamed into place when complete, so an
interrupted run leaves no half-written dataset behind (at worst a stale hidden staging folder, which the
image index ignores) and two processes racing to render it both end with the same folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pydc.data.cache import cache_dir

IMAGE_SIZE = 32
_COMPLETE_MARKER = ".complete"


def digits_folder(root: str | os.PathLike | None = None) -> Path:
    """Path of the rendered digits folder (default <cache>/digits, see pydc.data.cache), rendering it if needed."""
    target = Path(root).expanduser() if root is not None else cache_dir() / "digits"
    if (target / _COMPLETE_MARKER).exists():
        return target
    if target.exists():
        # Renders appear only through the atomic rename below, marker included: this folder is not one of ours.
        if any(target.iterdir()):
            raise ValueError(f"{str(target)!r} exists and is not a rendered digits folder (no {_COMPLETE_MARKER} "
                             f"marker); pass another root or remove it")
        target.rmdir()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _render(staging)
        (staging / _COMPLETE_MARKER).touch()
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / _COMPLETE_MARKER).exists():  # not another process's finished copy: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _render(folder: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in range(10):
        (folder / str(digit)).mkdir()
    for number, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        grey = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
        grey = grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        grey.convert("RGB").save(folder / str(label) / f"{number:04d}.png", optimize=False)
