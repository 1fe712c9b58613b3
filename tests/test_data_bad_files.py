"""Bad files are decoded correctly or skipped with one warning each, counted, and never shift another sample."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pydc.data import FeatureLoader, ImageFolderIndex, TrainLoader
from pydc.data.dali_backend import dali_available
from pydc.data.decode import MAX_PIXELS, UnreadableImage, decode, probe

# pytest resets warning filters per test; pydc.data.decode silences this torchvision deprecation at import.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*image decoding and encoding capabilities of TorchVision are deprecated:DeprecationWarning")

BACKENDS = ["torchvision", "torchvision-memory", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                          reason="NVIDIA DALI not installed"))]
# Files that must decode, with the RGB array each must decode to (exactly: lossless formats or conversions
# that PIL defines), and files that must be skipped.
DECODABLE = ("good.png", "grey.png", "rgba.png", "png16.png", "grey.jpg", "cmyk.jpg", "good.jpg")
UNDECODABLE = ("truncated.jpg", "zero.jpg", "text.jpg", "huge.png")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of pixel data (a decompression bomb)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def make_bad_folder(root, rng: np.random.Generator) -> dict[str, np.ndarray | None]:
    """One flat folder with every kind of awkward file; returns name -> expected RGB array (None: skipped)."""
    rgb = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, size=(40, 48), dtype=np.uint8)
    grey16 = rng.integers(0, 65536, size=(40, 48), dtype=np.uint16)
    alpha = rng.integers(0, 256, size=(40, 48, 1), dtype=np.uint8)
    good_jpeg = _encode(Image.fromarray(rgb), "JPEG", quality=95)
    files = {
        "good.png": (_encode(Image.fromarray(rgb), "PNG"), rgb),
        "grey.png": (_encode(Image.fromarray(grey), "PNG"), np.repeat(grey[..., None], 3, axis=2)),
        "rgba.png": (_encode(Image.fromarray(np.concatenate([rgb, alpha], axis=2)), "PNG"), rgb),
        "png16.png": (_encode(Image.fromarray(grey16), "PNG"),
                      np.repeat((grey16.astype(np.int64) * 255 // 65535).astype(np.uint8)[..., None], 3, axis=2)),
        "grey.jpg": (_encode(Image.fromarray(grey), "JPEG", quality=95), None),
        "cmyk.jpg": (_encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), None),
        "good.jpg": (good_jpeg, None),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], None),
        "zero.jpg": (b"", None),
        "text.jpg": (b"this is a text file, not a JPEG\n" * 4, None),
        "huge.png": (_png_header_only(20000, 20000), None),
    }
    expected = {}
    for name, (data, array) in files.items():
        (root / name).write_bytes(data)
        expected[name] = array
    return expected


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    expected = make_bad_folder(root, np.random.default_rng(7))
    return root, expected


def test_probe_and_decode_each_file(bad_folder):
    root, expected = bad_folder
    for name in DECODABLE:
        image = decode(probe(str(root / name)))
        assert image.dtype == torch.uint8 and image.shape == (3, 40, 48), name
        if expected[name] is not None:  # lossless: exact
            assert torch.equal(image, torch.from_numpy(expected[name]).permute(2, 0, 1)), name
    # Lossy JPEGs: compare with PIL's own RGB conversion (same libjpeg), within JPEG decoder differences.
    for name in ("grey.jpg", "cmyk.jpg", "good.jpg"):
        reference = torch.from_numpy(np.array(Image.open(root / name).convert("RGB"))).permute(2, 0, 1)
        difference = (decode(probe(str(root / name))).int() - reference.int()).abs()
        assert difference.float().mean() < 2.0, name
    for name in UNDECODABLE:
        with pytest.raises(UnreadableImage):
            decode(probe(str(root / name)))


def test_huge_header_is_refused_before_decoding(bad_folder):
    root, _ = bad_folder
    with pytest.raises(UnreadableImage, match="exceeds the limit"):
        probe(str(root / "huge.png"))
    assert 20000 * 20000 > MAX_PIXELS


def _run(loader_class, index, backend, **kwargs):
    with warnings.catch_warnings(record=True) as caught:  # the memory cache decodes (and warns) at construction
        warnings.simplefilter("always")
        loader = loader_class(index, 24, 4, backend=backend.split("-")[0], cache_in_memory=backend.endswith("memory"),
                              **kwargs)
        batches = list(loader)
    return loader, batches, [str(w.message) for w in caught if "pydc.data: skipping" in str(w.message)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loader_class", [FeatureLoader, TrainLoader])
def test_loaders_survive_bad_files(bad_folder, backend, loader_class):
    root, _ = bad_folder
    index = ImageFolderIndex(root, use_cache=False)
    loader, batches, messages = _run(loader_class, index, backend)
    names = [index.paths[i].rsplit("/", 1)[1] for b in batches for i in b.indices.tolist()]
    assert sorted(names) == sorted(DECODABLE)
    assert loader.stats["decoded"] == len(DECODABLE) and loader.stats["skipped"] == len(UNDECODABLE)
    assert sorted(p.rsplit("/", 1)[1] for p in loader.stats["skipped_files"]) == sorted(UNDECODABLE)
    assert len(messages) == len(UNDECODABLE)  # one warning per bad file
    for batch in batches:
        assert batch.images.shape == (len(batch.indices), 3, 24, 24) and batch.labels is None
    # Rows carry their own images: the lossless PNGs, decoded alone, give the same rows.
    reference = FeatureLoader(index, 24, 1, backend="torchvision", cache_in_memory=False)
    if loader_class is FeatureLoader:
        rows = {i: image for b in batches for i, image in zip(b.indices.tolist(), b.images)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reference loader's own skip warnings
            reference_batches = list(reference)
        for batch in reference_batches:
            if index.paths[batch.indices.item()].endswith(".png"):
                difference = (rows[batch.indices.item()].int() - batch.images[0].int()).abs()
                if backend.startswith("torchvision"):
                    assert difference.max() == 0
                else:  # DALI's antialiasing filter differs on downscaling (see test_data_loaders.py); a row
                    # holding another sample's (random) pixels would differ by ~85 on average
                    assert difference.float().mean() < 1.0

    # A second epoch counts the same, warns no more, and (DALI) needs no pipeline rebuild.
    fallbacks = getattr(loader._decoder, "fallback_batches", 0)
    if backend == "dali":
        assert fallbacks >= 1  # the truncated JPEG passes the header probe and fails inside DALI
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(loader)
    assert loader.stats["skipped"] == len(UNDECODABLE) and loader.stats["decoded"] == len(DECODABLE)
    assert not [w for w in caught if "pydc.data: skipping" in str(w.message)]
    assert getattr(loader._decoder, "fallback_batches", 0) == fallbacks


def test_labels_follow_their_samples_past_bad_files(tmp_path):
    rng = np.random.default_rng(3)
    for label in range(3):
        folder = tmp_path / f"class{label}"
        folder.mkdir()
        for number in range(3):
            # Each image's colour encodes its class, so a shifted label would show.
            pixels = np.full((20, 20, 3), 60 * (label + 1), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{number}.png")
        (folder / "broken.jpg").write_bytes(b"not an image" + rng.bytes(10))
    index = ImageFolderIndex(tmp_path, use_cache=False)
    for backend in ["torchvision"] + (["dali"] if dali_available() else []):
        loader = FeatureLoader(index, 16, 5, backend=backend, cache_in_memory=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches = list(loader)
        assert loader.stats["skipped"] == 3 and loader.stats["decoded"] == 9
        for batch in batches:
            assert torch.equal(batch.labels, torch.tensor([index.labels[i] for i in batch.indices.tolist()]))
            colour = batch.images[:, 0, 8, 8].long()
            assert torch.equal(colour, 60 * (batch.labels + 1))


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not installed")
def test_dali_routes_refused_files_to_torchvision_in_mixed_batches(bad_folder):
    root, _ = bad_folder
    index = ImageFolderIndex(root, use_cache=False)
    loaders = {backend: TrainLoader(index, 24, 4, backend=backend, seed=9, cache_in_memory=False)
               for backend in ("dali", "torchvision")}
    orders = [torch.arange(len(index)), torch.arange(len(index)).flip(0).repeat(2)]  # epoch 2: new batch mates
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch, order in enumerate(orders):
            results = {}
            for backend, loader in loaders.items():
                loader.set_order(order)
                loader.set_epoch(epoch)
                batches = list(loader)
                results[backend] = (torch.cat([b.images for b in batches]), torch.cat([b.indices for b in batches]))
                assert loader.stats["skipped"] == len(UNDECODABLE) * (epoch + 1)
            assert torch.equal(results["dali"][1], results["torchvision"][1])
            difference = (results["dali"][0].int() - results["torchvision"][0].int()).abs().float()
            assert difference.mean(dim=(1, 2, 3)).max() < 2.0  # per row: same file, same window
    assert loaders["dali"]._decoder.refused  # some files went the torchvision way in epoch 2
