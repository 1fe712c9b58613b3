"""FeatureLoader and TrainLoader: uint8 (B, 3, size, size) batches on the compute device, with indices.

Backends (backend=): "dali" (pydc.data.dali_backend), "torchvision" (pydc.data.torchvision_backend), or
"auto": small datasets (see pydc.data.memory) are decoded once by torchvision and kept in memory; otherwise,
on a GPU, DALI when it imports (nvJPEG decoding and GPU resizing in one graph), else torchvision; on the CPU,
torchvision: DALI's CPU decoding is as fast as torchvision's per thread, but its CPU resize took ~4 ms per
500x375 image against ~0.9 ms for torchvision's uint8 antialiased kernel on this project's 2-core machine
(benchmarks/test_bench_data.py), so the DALI CPU graph is there to test the GPU graph, not to be fast.
Normalisation is left to the model's stem.

Multi-crop (TrainLoader(views=...)): every batch holds several RandomResizedCrops of each image, of their own
sizes and scales (SwAV's 2 large + several small crops); `Batch.views` lists them, `Batch.images` is the first.
The torchvision backend decodes each file once for all views; DALI decodes each view's window (ROI decoding);
the in-memory cache cuts them from the decoded image. With color_distortion=True every view also gets SwAV's
colour jitter + random grayscale (pydc.data.color), drawn from (seed, epoch, batch number, view).

Bad files: every file is probed before decoding (pydc.data.decode). A file that cannot be decoded is skipped
with one warning (per loader) and counted in `stats` of the epoch: {"decoded": samples handed out,
"skipped": samples left out (a bad file drawn twice counts twice), "skipped_files": the distinct paths}.
A batch then holds fewer rows, and its `indices` and `labels` are those of the rows it holds, so nothing
shifts onto another sample. A batch whose samples all failed is not yielded.
"""

from __future__ import annotations

import collections
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pydc.data.dali_backend import DaliBackend, dali_available
from pydc.data.decode import MAX_PIXELS, UnreadableImage, probe
from pydc.data.color import color_distortion as distort_colors
from pydc.data.geometry import SCALE, CropView, CropWindows, random_resized_crops
from pydc.data.index import ImageFolderIndex
from pydc.data.memory import shared_in_memory
from pydc.data.torchvision_backend import TorchvisionBackend, decoding_pool

BACKENDS = ("auto", "dali", "torchvision")
PREFETCH_BATCHES = 2  # batches assembled ahead of the consumer by a background thread


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (B, 3, size, size) on the loader's device
    indices: torch.Tensor  # int64 (B,) dataset indices of the rows, on the CPU
    labels: torch.Tensor | None  # int64 (B,) class labels of the rows (None for a flat folder), on the CPU
    views: list[torch.Tensor] | None = None  # multi-crop: every crop view, same rows (images is views[0])
    number: int = 0  # its position in the epoch's batches (a batch whose files all fail is not yielded)


class _Loader:
    def __init__(self, index: ImageFolderIndex, size: int, batch_size: int, device, backend: str,
                 num_threads: int, progress: bool, seed: int, cache_in_memory: bool | None, max_pixels: int):
        if size <= 0 or batch_size <= 0 or num_threads <= 0:
            raise ValueError(f"size, batch_size and num_threads must be positive, got {size}, {batch_size}, "
                             f"{num_threads}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.index = index
        self.size = size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.progress = progress
        self.seed = seed
        self.max_pixels = max_pixels
        self._labels = torch.tensor(index.labels, dtype=torch.int64) if index.labels is not None else None
        self._pool = decoding_pool(num_threads, "pydc-probe")
        self._assembler = decoding_pool(1, "pydc-batch")  # builds batches in order, ahead of the consumer
        self._known_bad: dict[int, str] = {}  # dataset index -> reason, remembered across epochs
        self._warned: set[int] = set()
        self._skipped_this_epoch: set[str] = set()
        self.stats = _empty_stats()
        self._start = 0  # the batch the next iteration starts at (start_at)

        self.memory = None
        if backend != "dali" and cache_in_memory is not False:
            self.memory = shared_in_memory(index, self.device, self._pool, max_pixels)
            if self.memory is None and cache_in_memory:
                raise ValueError("cache_in_memory=True but the dataset exceeds pydc.data.memory's limits")
        if self.memory is not None:
            for index_of_file, reason in sorted(self.memory.failures.items()):
                self._mark_bad(index_of_file, reason)
            self.backend = "torchvision"
            self._decoder = None
        else:
            use_dali = backend == "dali" or (backend == "auto" and self.device.type == "cuda" and dali_available())
            self.backend = "dali" if use_dali else "torchvision"
            self._decoder = DaliBackend(self.device, num_threads, batch_size, seed) if use_dali \
                else TorchvisionBackend(self.device, num_threads)

    def __len__(self) -> int:
        """Number of batches of the current epoch (before skipping any that fail entirely)."""
        return -(-len(self._epoch_indices()) // self.batch_size)

    def start_at(self, batch_number: int) -> None:
        """Make the next iteration (only that one) begin at batch `batch_number` of the epoch: the batches before
        it are neither read nor decoded (a resumed epoch). A batch's augmentation draws depend only on (seed,
        epoch, batch number), so batch n is the same whether the iteration started at 0 or at n."""
        if batch_number < 0:
            raise ValueError(f"batch_number must be >= 0, got {batch_number}")
        self._start = int(batch_number)

    def __iter__(self):
        indices = np.asarray(self._epoch_indices(), dtype=np.int64)
        self.stats = _empty_stats()
        self._skipped_this_epoch = set()
        chunks = [indices[start:start + self.batch_size] for start in range(0, len(indices), self.batch_size)]
        first, self._start = min(self._start, len(chunks)), 0
        bar = tqdm(total=len(chunks), initial=first, desc=type(self).__name__, unit="batch",
                   disable=None if self.progress else True, leave=False)
        # Batches are assembled in order by one background thread, PREFETCH_BATCHES ahead of the consumer.
        pending: collections.deque = collections.deque()
        submitted = first
        try:
            while pending or submitted < len(chunks):
                while submitted < len(chunks) and len(pending) <= PREFETCH_BATCHES:
                    pending.append(self._assembler.submit(self._batch, chunks[submitted], submitted))
                    submitted += 1
                batch = pending.popleft().result()
                bar.update(1)
                if batch is not None:
                    yield batch
        finally:  # also on an early break: drop what was not started, let the running batch finish
            for future in pending:
                future.cancel()
            for future in pending:
                if not future.cancelled():
                    future.exception()
            bar.close()

    def _epoch_indices(self):
        raise NotImplementedError

    def _view_plan(self, heights, widths, batch_number) -> list[tuple[CropWindows | None, int]]:
        """[(crop windows or None for the centre crop, output size)] per view of the batch."""
        return [(None, self.size)]

    def _finish_views(self, views: list[torch.Tensor], batch_number: int) -> list[torch.Tensor]:
        """Per-view work on the device after decoding (colour distortion); none by default."""
        return views

    def _batch(self, indices: np.ndarray, batch_number: int) -> Batch | None:
        """The batch of dataset `indices` (the `batch_number`-th of the epoch), without the rows that fail."""
        headers, sizes = self._screen(indices)
        # Windows are drawn for every row (failures included) so that one bad file changes no other row's crop.
        plan = self._view_plan(sizes[:, 0], sizes[:, 1], batch_number)
        good = np.array(sorted(headers), dtype=np.int64)
        decoded = self._decode_views(indices[good], [headers[row] for row in good.tolist()],
                                     [(None if windows is None else windows.select(good), size)
                                      for windows, size in plan])
        failed = {position: reason for _, view_failed in decoded for position, reason in view_failed.items()}
        for position, reason in failed.items():
            self._mark_bad(int(indices[good[position]]), reason)
        kept_positions = [position for position in range(len(good)) if position not in failed]
        kept = good[kept_positions] if kept_positions else np.zeros(0, dtype=np.int64)
        self._count_skipped(indices[np.setdiff1d(np.arange(len(indices)), kept)])
        if any(images is None for images, _ in decoded) or len(kept) == 0:
            return None
        self.stats["decoded"] += len(kept)
        views = []
        for images, view_failed in decoded:
            if view_failed.keys() != failed.keys():  # another view failed rows this one decoded: drop them here too
                decoded_positions = [position for position in range(len(good)) if position not in view_failed]
                images = images[[decoded_positions.index(position) for position in kept_positions]]
            views.append(images.to(self.device, non_blocking=True))
        views = self._finish_views(views, batch_number)
        kept_indices = torch.from_numpy(indices[kept])
        labels = self._labels[kept_indices] if self._labels is not None else None
        return Batch(images=views[0], indices=kept_indices, labels=labels, views=views if len(views) > 1 else None,
                     number=batch_number)

    def _decode_views(self, indices: np.ndarray, headers: list, plan) -> list:
        """[(images, {position: reason})] per view of `plan`; the torchvision backend decodes each file once."""
        if len(plan) > 1 and self.memory is None and isinstance(self._decoder, TorchvisionBackend) and len(indices):
            return self._decoder.train_views(headers, [windows for windows, _ in plan], [size for _, size in plan])
        return [self._decode(indices, headers, windows, size) for windows, size in plan]

    def _screen(self, indices: np.ndarray):
        """({row: header (None from memory)} of the rows not known or found bad, (height, width) of every row)."""
        headers: dict = {}
        sizes = np.ones((len(indices), 2), dtype=np.int64)  # 1x1 for failures: their windows are drawn, unused
        todo = [row for row, index in enumerate(indices.tolist()) if index not in self._known_bad]
        if self.memory is not None:
            headers = dict.fromkeys(todo)
            sizes[todo] = self.memory.sizes[indices[todo]]
            return headers, sizes
        for row, header in zip(todo, self._pool.map(self._probe, indices[todo].tolist())):
            if isinstance(header, UnreadableImage):
                self._mark_bad(int(indices[row]), str(header))
            else:
                headers[row], sizes[row] = header, (header.height, header.width)
        return headers, sizes

    def _decode(self, indices: np.ndarray, headers: list, windows: CropWindows | None, size: int):
        """(uint8 images of the rows that decoded, {position: reason} of those that did not)."""
        if len(indices) == 0:
            return None, {}
        if self.memory is not None:
            selected = torch.from_numpy(indices)
            return (self.memory.feature(selected, size) if windows is None
                    else self.memory.train(selected, windows, size))
        keys = indices.tolist()
        return (self._decoder.feature(headers, size, keys) if windows is None
                else self._decoder.train(headers, windows, size, keys))

    def _count_skipped(self, skipped_indices: np.ndarray):
        for index in skipped_indices.tolist():
            self.stats["skipped"] += 1
            path = self.index.paths[index]
            if path not in self._skipped_this_epoch:
                self._skipped_this_epoch.add(path)
                self.stats["skipped_files"].append(path)

    def _probe(self, index: int):
        try:
            return probe(self.index.paths[index], self.max_pixels)
        except UnreadableImage as error:
            return error

    def _mark_bad(self, index: int, reason: str):
        self._known_bad[index] = reason
        if index not in self._warned:
            self._warned.add(index)
            warnings.warn(f"pydc.data: skipping {self.index.paths[index]}: {reason}", stacklevel=2)

    def close(self):
        self._assembler.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=False)
        if self._decoder is not None:
            self._decoder.close()


class FeatureLoader(_Loader):
    """Every sample of this rank's shard once, in index order: resize the shorter side to size*256/224, centre crop.

    Rank r of world_size gets the contiguous shard [N*r//world_size, N*(r+1)//world_size), so the shards of
    ranks 0..world_size-1, concatenated, are the index order. The last batch is partial, never padded.
    """

    def __init__(self, index, size, batch_size, device="cpu", backend="auto", num_threads=2, rank=0, world_size=1,
                 progress=False, cache_in_memory=None, max_pixels=MAX_PIXELS):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        super().__init__(index, size, batch_size, device, backend, num_threads, progress, 0, cache_in_memory,
                         max_pixels)
        self.rank, self.world_size = rank, world_size

    def _epoch_indices(self):
        count = len(self.index)
        return np.arange(count * self.rank // self.world_size, count * (self.rank + 1) // self.world_size)


class TrainLoader(_Loader):
    """Training batches in the order given by set_order(), with RandomResizedCrop(size, crop_scale) and flips.

    crop_scale is the range of the crop's area fraction, torchvision's (0.08, 1) by default. views: a sequence
    of CropView(size, scale), one per crop of a multi-crop batch (size and crop_scale are then unused; view 0
    is cut exactly as the single crop would be with its size and scale). color_distortion: SwAV's colour jitter
    and random grayscale on every view (pydc.data.color), at strength s = the value given (True: s = 1, SwAV's;
    False or 0: none).

    set_order(indices) takes this epoch's order for this rank (from a sampler: duplicates allowed);
    set_epoch(epoch) picks the augmentation draws, which depend only on (seed, epoch, batch number, position in
    the batch), so an epoch is reproduced exactly by the same seed, epoch and order, on either backend.
    """

    def __init__(self, index, size, batch_size, device="cpu", backend="auto", num_threads=2, seed=0,
                 progress=False, cache_in_memory=None, max_pixels=MAX_PIXELS, crop_scale=SCALE, views=None,
                 color_distortion=False):
        low, high = (float(v) for v in crop_scale)
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(crop_scale)}")
        if views is not None:
            views = tuple(views)
            if not views or not all(isinstance(view, CropView) for view in views):
                raise ValueError(f"views must be a non-empty sequence of pydc.data.geometry.CropView, got {views!r}")
            for view in views:
                if int(view.size) != view.size or view.size <= 0:
                    raise ValueError(f"every view's size must be a positive integer, got {view.size!r}")
                if not 0.0 < float(view.scale[0]) <= float(view.scale[1]) <= 1.0:
                    raise ValueError(f"every view's scale must satisfy 0 < min <= max <= 1, got {tuple(view.scale)}")
        super().__init__(index, size, batch_size, device, backend, num_threads, progress, seed, cache_in_memory,
                         max_pixels)
        self.crop_scale = (low, high)
        self.views = views if views is not None else (CropView(size, (low, high)),)
        strength = float(color_distortion)
        if not strength >= 0.0 or not math.isfinite(strength):
            raise ValueError(f"color_distortion must be a finite strength >= 0 (or a bool), got {color_distortion!r}")
        self.color_strength = strength
        self.color_distortion = strength > 0.0
        self.epoch = 0
        self._order = np.arange(len(index), dtype=np.int64)

    def set_order(self, indices) -> None:
        order = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
        if len(order) and (order.min() < 0 or order.max() >= len(self.index)):
            raise ValueError(f"sample indices must lie in [0, {len(self.index)}), got range "
                             f"[{order.min()}, {order.max()}]")
        self._order = order

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _epoch_indices(self):
        return self._order

    def _view_plan(self, heights, widths, batch_number):
        return [(random_resized_crops(heights, widths, self.seed, self.epoch, batch_number,
                                      (float(view.scale[0]), float(view.scale[1])), view=number), int(view.size))
                for number, view in enumerate(self.views)]

    def _finish_views(self, views, batch_number):
        if not self.color_distortion:
            return views
        # Key 1 after the view number keeps these draws apart from the crop windows' (seed, epoch, batch, view).
        return [distort_colors(images, np.random.default_rng([self.seed, self.epoch, batch_number, number, 1]),
                               self.color_strength)
                for number, images in enumerate(views)]


def _empty_stats() -> dict:
    return {"decoded": 0, "skipped": 0, "skipped_files": []}
