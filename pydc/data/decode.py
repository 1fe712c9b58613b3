"""Reading, screening and decoding one image file into an RGB uint8 (3, H, W) tensor.

Every loader goes through `probe` before decoding anything: it reads the file's bytes and parses only the
header (PIL opens lazily), which is enough to reject empty or unidentifiable files and images larger than
`MAX_PIXELS` before a decoder allocates their full size (a 20000x20000 header would otherwise ask for 1.2 GB).
The header also gives the width and height that the random crop parameters need, so no decode happens twice.

Decoding: torchvision.io.decode_image (libjpeg-turbo, libpng, libwebp; on a GPU, nvJPEG through
decode_jpeg(device="cuda") for JPEGs) in RGB mode, which already turns grey, CMYK and RGBA into RGB; 16-bit
PNGs come back as uint16 and are scaled to uint8 as floor(v * 255 / 65535) (so only 65535 maps to 255);
formats torchvision does not read (BMP, TIFF) go through PIL. A file that fails every decoder (truncated JPEG,
text named .jpg) is reported by raising `UnreadableImage`, which the loaders turn into one warning and a
count; they never substitute another sample. Each UnreadableImage carries a `kind` (one of FAILURE_KINDS),
so that a folder's failures can be summarised by kind (pydc.data.screen).
Images under MIN_SIDE pixels on a side are refused by `probe` too: a 1x1 image is one colour, which the
Sobel stem turns into zeros, so it can only dilute the clusters.

Why torchvision and not TorchCodec: torchvision 0.29 deprecates its image decoders in favour of TorchCodec.
TorchCodec 0.17 (checked with torch 2.14.1 on the CPU) decodes JPEG, PNG, WebP, GIF, AVIF and HEIC with the
libraries its wheel bundles (libjpeg-turbo, libpng, libwebp, libavif; FFmpeg is needed only for its video and
audio decoders, and none is installed here). It gives the same pixels as torchvision on 256 synthetic 500x375
JPEGs and 64 PNGs, and on grey, CMYK, RGBA and progressive files; 16-bit PNGs it rounds to the nearest uint8
(torchvision returns uint16, which pydc floors, see above). It is not faster: one thread, the same encoded
bytes, torchvision and TorchCodec alternating in 15 and 21 rounds on the shared 2-core AMD EPYC (Zen 4,
AVX-512; load average 9-14 from other jobs), the median ratio of torchvision's time to TorchCodec's was 0.95
both times on the 256 JPEGs (quartiles 0.88-1.05 and 0.91-1.01: TorchCodec ~5% slower) and 0.96/0.98 on the
PNGs (quartiles straddling 1). Both wrap libjpeg-turbo and libpng. Moving would add a compiled dependency tied
to each torch release for no speed, so pydc keeps torchvision's decoders and silences their deprecation
warning (below, and in pyproject.toml for the tests); the move is due when torchvision drops them, keeping
decode()'s contract (RGB uint8, the 16-bit scaling, UnreadableImage).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# Largest image (width * height) a loader decodes: 64 megapixels (e.g. 8000 x 8000), 192 MB as RGB uint8 per
# image and per decoding thread. Larger images are skipped with a warning. PIL's own bomb guard starts at 89M.
MAX_PIXELS = 64_000_000
# Smallest width and height a loader accepts (the small net's own smallest crop is 8x8).
MIN_SIDE = 8
FAILURE_KINDS = ("unreadable", "empty file", "not an image", "too large", "too small", "corrupt")

# torchvision 0.29 warns (DeprecationWarning) on every decode that its image I/O is deprecated in favour of
# TorchCodec; the warning says nothing about the file. It is silenced once, here, for that message only: a
# warnings.catch_warnings() around each decode would not be thread-safe (it swaps the process-wide filter
# list), and the decoding threads run concurrently.
_DEPRECATION = r".*image decoding and encoding capabilities of TorchVision are deprecated.*"
warnings.filterwarnings("ignore", message=_DEPRECATION, category=DeprecationWarning)

# Formats torchvision.io.decode_image reads itself; anything else PIL decodes.
_TORCHVISION_FORMATS = {"JPEG", "PNG", "WEBP", "GIF"}


class UnreadableImage(Exception):
    """A file no decoder could turn into an image; the message says why, `kind` which of FAILURE_KINDS."""

    def __init__(self, message: str, kind: str = "corrupt"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an encoded image says, read without decoding the pixels."""

    data: bytes
    format: str  # PIL's name: "JPEG", "PNG", ...
    mode: str  # PIL's mode: "RGB", "L", "CMYK", "RGBA", "I;16", ...
    width: int
    height: int


def read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def probe(path: str, max_pixels: int = MAX_PIXELS) -> ImageHeader:
    """Read `path` and parse its header; raise UnreadableImage for empty, unknown or oversized files."""
    try:
        data = read_file(path)
    except OSError as error:
        raise UnreadableImage(f"cannot read: {error}", "unreadable") from error
    if not data:
        raise UnreadableImage("empty file (0 bytes)", "empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            header = ImageHeader(data, image.format or "", image.mode, image.width, image.height)
    except Image.DecompressionBombError as error:  # PIL's own guard (2 * Image.MAX_IMAGE_PIXELS) came first
        raise UnreadableImage(f"header size exceeds the limit of {max_pixels} pixels (PIL: {error})",
                              "too large") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise UnreadableImage(f"not an image PIL can identify: {error}", "not an image") from error
    if header.width < MIN_SIDE or header.height < MIN_SIDE:
        raise UnreadableImage(f"image size {header.width}x{header.height} is under the minimum of {MIN_SIDE}x"
                              f"{MIN_SIDE} pixels (pydc.data.decode.MIN_SIDE)", "too small")
    if header.width * header.height > max_pixels:
        raise UnreadableImage(f"header size {header.width}x{header.height} exceeds the limit of {max_pixels} pixels "
                              f"(pydc.data.decode.MAX_PIXELS)", "too large")
    return header


def decode(header: ImageHeader, device: torch.device | str = "cpu") -> torch.Tensor:
    """Decode a probed file into an RGB uint8 (3, H, W) tensor on `device`; raise UnreadableImage on failure."""
    device = torch.device(device)
    if header.format in _TORCHVISION_FORMATS:
        try:
            image = _decode_torchvision(header, device)
        except (RuntimeError, ValueError) as error:
            # torchvision refuses truncated data and a few exotic variants; PIL is stricter on truncation
            # (it raises too) and more lenient on the rest, so it gets the last word.
            image = _decode_pil(header, first_error=error)
    else:
        image = _decode_pil(header)
    if image.shape[1:] != (header.height, header.width):
        raise UnreadableImage(f"decoded size {tuple(image.shape[1:])} differs from the header's "
                              f"{(header.height, header.width)}")
    return image.to(device, non_blocking=True)


def _decode_torchvision(header: ImageHeader, device: torch.device) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    encoded = torch.frombuffer(bytearray(header.data), dtype=torch.uint8)
    if device.type == "cuda" and header.format == "JPEG" and header.mode in ("RGB", "L"):
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    image = decode_image(encoded, mode=ImageReadMode.RGB)
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) * 255 // 65535).to(torch.uint8)
    return image


def _decode_pil(header: ImageHeader, first_error: Exception | None = None) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(header.data)) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                # PIL's convert("RGB") clips 16-bit values instead of scaling them.
                values = np.asarray(image, dtype=np.int64)
                scale = 65535 if image.mode.startswith("I;16") or values.max() > 255 else 255
                grey = (np.clip(values, 0, scale) * 255 // scale).astype(np.uint8)
                array = np.repeat(grey[:, :, None], 3, axis=2)
            else:
                array = np.array(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as error:
        reason = f"{error}" if first_error is None else f"{first_error}; PIL: {error}"
        raise UnreadableImage(f"cannot decode {header.format} {header.width}x{header.height}: {reason}") from error
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
