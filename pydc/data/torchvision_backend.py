"""The torchvision backend: decode with torchvision (PIL fallback), crop and resize with torchvision's kernels.

On the CPU a thread pool decodes and transforms the samples of a batch in parallel (torchvision's decoders
and resize kernels release the GIL). On a GPU, JPEGs are decoded in one batched nvJPEG call
(torchvision.io.decode_jpeg(list, device="cuda")) and transformed on the device; other formats are decoded on
the CPU and copied over. Resizing is bilinear with antialiasing, as torchvision.transforms.v2 does it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from pydc.data.decode import ImageHeader, UnreadableImage, decode
from pydc.data.geometry import CropWindows, feature_geometry


def resize_uint8(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear antialiased resize of uint8 (..., C, H, W), as torchvision.transforms.v2.functional.resize.

    Called directly rather than through torchvision's dispatcher, whose per-call Python overhead is larger than
    the work on a 32x32 image. CPU: torch's uint8 kernel; CUDA (no uint8 kernel): float, rounded back.
    """
    if images.shape[-2:] == (height, width):
        return images
    batch = images.reshape(-1, *images.shape[-3:])
    if batch.device.type == "cpu":
        resized = F.interpolate(batch, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    else:
        resized = F.interpolate(batch.float(), size=(height, width), mode="bilinear", antialias=True,
                                align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
    return resized.reshape(*images.shape[:-2], height, width)


def feature_transform(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to size*256/224 and cut the centred size x size window (uint8 CHW in and out)."""
    resized_h, resized_w, top, left = feature_geometry(image.shape[-2], image.shape[-1], size)
    return resize_uint8(image, resized_h, resized_w)[..., top:top + size, left:left + size]


def train_transform(image: torch.Tensor, windows: CropWindows, row: int, size: int) -> torch.Tensor:
    """Cut window `row` of `windows`, resize it to size x size, flip it if drawn so."""
    top, left = int(windows.top[row]), int(windows.left[row])
    window = image[..., top:top + int(windows.height[row]), left:left + int(windows.width[row])]
    resized = resize_uint8(window, size, size)
    return resized.flip(-1) if windows.flip[row] else resized


def decoding_pool(num_threads: int, name: str) -> ThreadPoolExecutor:
    """A pool of `num_threads` threads whose torch ops each run on one thread.

    The threads already work in parallel; letting each also start an intra-op (OpenMP) team oversubscribes the
    cores, and on a loaded 2-core machine a 256-image pass took 3.5-5 s instead of 0.75 s. torch's thread count
    is per thread under OpenMP: the caller keeps its own (read first, so that its lazy initialisation is done);
    threads started later without their own setting inherit 1.
    """
    torch.get_num_threads()
    return ThreadPoolExecutor(max_workers=max(1, num_threads), thread_name_prefix=name,
                              initializer=torch.set_num_threads, initargs=(1,))


class TorchvisionBackend:
    """Decodes and transforms lists of probed files; failures are reported per sample, never substituted."""

    name = "torchvision"

    def __init__(self, device: torch.device, num_threads: int):
        self.device = device
        self.pool = decoding_pool(num_threads, "pydc-decode")

    def feature(self, headers, size, keys=None):
        return self._apply(headers, lambda image, row: feature_transform(image, size))

    def train(self, headers, windows: CropWindows, size, keys=None):
        return self._apply(headers, lambda image, row: train_transform(image, windows, row, size))

    def train_views(self, headers, windows: list[CropWindows], sizes: list[int], keys=None):
        """Multi-crop: [(images, failures)] per view, `windows[v]` resized to `sizes[v]`; each file decoded once."""
        def transform(image, row):
            return [train_transform(image, view_windows, row, size) for view_windows, size in zip(windows, sizes)]

        results = self._transformed(headers, transform)
        return [collect([(row, crops if isinstance(crops, UnreadableImage) else crops[view]) for row, crops in results],
                        self.device) for view in range(len(sizes))]

    def _apply(self, headers, transform):
        """(images (k, 3, size, size) of the samples that decoded, {row: reason} for those that did not)."""
        return collect(self._transformed(headers, transform), self.device)

    def _transformed(self, headers, transform) -> list:
        """[(row, transform(decoded image, row) or the UnreadableImage)] for every row."""
        if self.device.type == "cuda":
            decoded = enumerate(_decode_cuda(headers, self.device, self.pool))
            return [(row, image if isinstance(image, UnreadableImage) else transform(image, row))
                    for row, image in decoded]

        def work(row):
            image = _decode_or_error(headers[row])
            return row, image if isinstance(image, UnreadableImage) else transform(image, row)
        return list(self.pool.map(work, range(len(headers))))

    def close(self):
        self.pool.shutdown(wait=False)


def collect(results, device) -> tuple[torch.Tensor | None, dict[int, str]]:
    """Stack the successful per-row results; gather the failures' reasons by row."""
    images = [image for _, image in results if not isinstance(image, UnreadableImage)]
    failed = {row: str(image) for row, image in results if isinstance(image, UnreadableImage)}
    stacked = torch.stack(images).contiguous() if images else None
    return stacked, failed


def _decode_or_error(header: ImageHeader) -> torch.Tensor | UnreadableImage:
    try:
        return decode(header, "cpu")
    except UnreadableImage as error:
        return error


def _decode_cuda(headers, device, pool) -> list[torch.Tensor | UnreadableImage]:
    from torchvision.io import ImageReadMode, decode_jpeg

    results: list = [None] * len(headers)
    on_gpu = [row for row, h in enumerate(headers) if h.format == "JPEG" and h.mode in ("RGB", "L")]
    if on_gpu:
        encoded = [torch.frombuffer(bytearray(headers[row].data), dtype=torch.uint8) for row in on_gpu]
        try:
            images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
            for row, image in zip(on_gpu, images):
                results[row] = image
        except RuntimeError:
            pass  # one bad JPEG fails the whole nvJPEG batch: the rows left empty are retried one by one below
    rest = [row for row in range(len(headers)) if results[row] is None]
    for row, image in zip(rest, pool.map(_decode_or_error, [headers[row] for row in rest])):
        results[row] = image if isinstance(image, UnreadableImage) else image.to(device, non_blocking=True)
    return results
