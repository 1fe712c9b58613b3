"""Small datasets decoded once and kept in memory (on the loader's device) as uint8.

The default training data (the digits, 1797 PNGs of 32x32) decodes in a fraction of a second, while reading
and decoding it again every batch would cost more Python overhead per image than the model on 2 cores.
A dataset is kept in memory when it has at most MEMORY_CACHE_MAX_FILES files, whose encoded size is at most
MEMORY_CACHE_MAX_ENCODED_BYTES (checked with one stat per file, before anything is read) and whose decoded
size (from the headers) is at most MEMORY_CACHE_MAX_DECODED_BYTES. When every image has the same size they
are stacked into one (N, 3, H, W) tensor and the feature pass resizes whole batches in one call; the
results are the same as the per-image path (same torchvision kernel). Loaders built on the same
ImageFolderIndex object share one decoded copy.
"""

from __future__ import annotations

import os
import weakref

import numpy as np
import torch

from pydc.data.decode import UnreadableImage, decode, probe
from pydc.data.geometry import CropWindows
from pydc.data.torchvision_backend import collect, feature_transform, train_transform

MEMORY_CACHE_MAX_FILES = 20_000
MEMORY_CACHE_MAX_ENCODED_BYTES = 64 * 2**20
MEMORY_CACHE_MAX_DECODED_BYTES = 256 * 2**20


def fits_in_memory(paths: list[str]) -> bool:
    """Cheap pre-check (file count and on-disk size) before headers are read."""
    if len(paths) > MEMORY_CACHE_MAX_FILES:
        return False
    total = 0
    for path in paths:
        try:
            total += os.stat(path).st_size
        except OSError:
            continue
        if total > MEMORY_CACHE_MAX_ENCODED_BYTES:
            return False
    return True


# Decoded datasets per ImageFolderIndex object (and device, pixel limit): the feature and the training loader
# of one run share one copy. Entries live as long as their index object.
_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_in_memory(index, device: torch.device, pool, max_pixels: int) -> "DecodedImages | None":
    """load_in_memory(index.paths, ...), computed once per index object, device and pixel limit."""
    per_index = _SHARED.setdefault(index, {})
    key = (str(device), max_pixels)
    if key not in per_index:
        per_index[key] = load_in_memory(index.paths, device, pool, max_pixels)
    return per_index[key]


def load_in_memory(paths: list[str], device: torch.device, pool, max_pixels: int) -> "DecodedImages | None":
    """All images of `paths` decoded, or None when the dataset is too large for the memory cache."""
    if not fits_in_memory(paths):
        return None

    def read_header(position):
        try:
            return probe(paths[position], max_pixels)
        except UnreadableImage as error:
            return error

    headers = _chunked_map(pool, read_header, range(len(paths)))
    decoded_bytes = sum(3 * h.width * h.height for h in headers if not isinstance(h, UnreadableImage))
    if decoded_bytes > MEMORY_CACHE_MAX_DECODED_BYTES:
        return None
    return DecodedImages(headers, device, pool)


class DecodedImages:
    """Every decodable image of a dataset, decoded once; `failures` maps dataset index -> reason."""

    def __init__(self, headers: list, device: torch.device, pool):
        self.device = device
        self.failures: dict[int, str] = {}

        def load(header):
            if isinstance(header, UnreadableImage):
                return header
            try:
                return decode(header, "cpu")
            except UnreadableImage as error:
                return error

        images: list[torch.Tensor | None] = []
        for position, image in enumerate(_chunked_map(pool, load, headers)):
            if isinstance(image, UnreadableImage):
                self.failures[position] = str(image)
                image = None
            images.append(image)
        # (height, width) of every image, 1x1 for failures (never handed out): the training windows need them.
        self.sizes = np.array([image.shape[1:] if image is not None else (1, 1) for image in images], dtype=np.int64)
        shapes = {tuple(image.shape) for image in images if image is not None}
        self.stacked: torch.Tensor | None = None
        self.images: list[torch.Tensor | None] | None = None
        if len(shapes) == 1:
            # Failed images get a zero placeholder row that is never handed out (their indices are skipped).
            placeholder = torch.zeros(shapes.pop(), dtype=torch.uint8)
            self.stacked = torch.stack([image if image is not None else placeholder for image in images]).to(device)
        else:
            self.images = [image.to(device) if image is not None else None for image in images]


    def feature(self, indices: torch.Tensor, size: int):
        if self.stacked is not None:
            return feature_transform(self.stacked[indices.to(self.stacked.device)], size).contiguous(), {}
        return collect([(row, feature_transform(self.images[i], size)) for row, i in enumerate(indices.tolist())],
                       self.device)

    def train(self, indices: torch.Tensor, windows: CropWindows, size: int):
        if self.stacked is not None:
            source = self.stacked[indices.to(self.stacked.device)]
            results = [(row, train_transform(source[row], windows, row, size)) for row in range(len(indices))]
        else:
            results = [(row, train_transform(self.images[i], windows, row, size))
                       for row, i in enumerate(indices.tolist())]
        return collect(results, self.device)


def _chunked_map(pool, function, items, chunk: int = 64) -> list:
    """pool.map over chunks of items: one task per image costs more than decoding a 32x32 PNG."""
    items = list(items)
    chunks = [items[start:start + chunk] for start in range(0, len(items), chunk)]
    return [result for part in pool.map(lambda part: [function(item) for item in part], chunks) for result in part]
