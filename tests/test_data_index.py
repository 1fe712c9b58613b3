"""ImageFolderIndex (sorting, labels, on-disk cache and its invalidation), digits_folder, synthetic_jpegs."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

import pydc.data.digits as digits_module
from pydc.data import ImageFolderIndex, digits_folder, synthetic_jpegs


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYDC_CACHE", str(tmp_path / "cache"))


# These tests look at the listing; screen=False skips decoding a file (see tests/test_bad_inputs.py for that).
def _touch_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path)


def test_class_folders_sorted_with_labels(tmp_path):
    root = tmp_path / "data"
    for relative in ["b/2.png", "b/1.jpg", "a/z.png", "a/sub/y.png", "c/x.webp", "a/.hidden.png", "a/notes.txt"]:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"x")  # the index looks at names only
    index = ImageFolderIndex(root, screen=False)
    relative = [os.path.relpath(p, root) for p in index.paths]
    assert relative == ["a/sub/y.png", "a/z.png", "b/1.jpg", "b/2.png", "c/x.webp"]
    assert index.classes == ["a", "b", "c"] and index.labels == [0, 0, 1, 1, 2] and len(index) == 5


def test_flat_folder_has_no_labels(tmp_path):
    for name in ["3.png", "1.png", "2.PNG"]:
        _touch_png(tmp_path / "flat" / name)
    index = ImageFolderIndex(tmp_path / "flat", screen=False)
    assert [os.path.basename(p) for p in index.paths] == ["1.png", "2.PNG", "3.png"]
    assert index.labels is None and index.classes == []


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        ImageFolderIndex(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderIndex(tmp_path / "missing")


def test_scan_is_cached_and_invalidated_by_changes(tmp_path):
    root = tmp_path / "data"
    for name in ["a/1.png", "a/2.png", "b/1.png"]:
        _touch_png(root / name)
    first = ImageFolderIndex(root, screen=False)
    assert not first.from_cache
    second = ImageFolderIndex(root, screen=False)
    assert second.from_cache and second.paths == first.paths and second.labels == first.labels

    time.sleep(0.01)  # directory mtimes have nanosecond resolution here, but leave the clock room to move
    _touch_png(root / "b" / "2.png")
    third = ImageFolderIndex(root, screen=False)
    assert not third.from_cache and len(third) == 4
    (root / "a" / "1.png").unlink()
    assert len(ImageFolderIndex(root, screen=False)) == 3
    _touch_png(root / "c" / "0.png")  # a new class folder changes the root's mtime
    fourth = ImageFolderIndex(root, screen=False)
    assert fourth.classes == ["a", "b", "c"] and not fourth.from_cache
    assert ImageFolderIndex(root, screen=False).from_cache


def test_digits_folder_rendered_once(tmp_path, monkeypatch):
    root = digits_folder()
    assert root == tmp_path / "cache" / "digits"
    index = ImageFolderIndex(root, screen=False)
    assert len(index) == 1797 and index.classes == [str(d) for d in range(10)]
    with Image.open(index.paths[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    pixels = np.asarray(Image.open(index.paths[0]))
    assert pixels.max() > 100 and (pixels[..., 0] == pixels[..., 2]).all()
    # Second call: nothing is rendered again.
    monkeypatch.setattr(digits_module, "_render", lambda folder: pytest.fail("rendered twice"))
    assert digits_folder() == root


def test_digits_folder_after_an_interrupted_render(tmp_path):
    target = tmp_path / "digits"
    _touch_png(tmp_path / ".digits-stale" / "3" / "0001.png")  # staging folder of a killed run
    root = digits_folder(target)
    assert len(ImageFolderIndex(root, use_cache=False)) == 1797
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".digits-")] == [".digits-stale"]


def test_digits_folder_refuses_to_overwrite_a_foreign_folder(tmp_path):
    _touch_png(tmp_path / "mine" / "photo.png")
    with pytest.raises(ValueError, match="not a rendered digits folder"):
        digits_folder(tmp_path / "mine")
    assert (tmp_path / "mine" / "photo.png").exists()


def test_synthetic_jpegs_look_like_photos(tmp_path):
    paths = synthetic_jpegs(tmp_path / "jpegs", 4, size=(200, 150), seed=1)
    assert len(paths) == 4
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (200, 150)
            pixels = np.asarray(image.convert("L"), dtype=np.float64)
        # Natural-image statistics: real contrast, and neighbouring pixels strongly correlated (not noise).
        assert pixels.std() > 10
        correlation = np.corrcoef(pixels[:, :-1].ravel(), pixels[:, 1:].ravel())[0, 1]
        assert correlation > 0.8
        assert 2_000 < os.path.getsize(path) < 60_000  # a 200x150 photo at quality 90, not noise (~60 kB)
    again = synthetic_jpegs(tmp_path / "again", 4, size=(200, 150), seed=1)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
