"""Resume without re-decoding: a training loader started at batch n (TrainLoader.start_at) decodes only the files
of the batches it hands out, and hands out exactly the batches n, n+1, ... of an iteration from the start
(a batch's crops, flips and colours depend only on (seed, epoch, batch number))."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import pydc.data.loaders as loaders_module
import pydc.data.torchvision_backend as torchvision_backend
from pydc.data import ImageFolderIndex, TrainLoader
from pydc.data.dali_backend import dali_available
from pydc.data.geometry import CropView
from tests.test_train import make_image_folder

BATCH = 12  # 72 images: 6 batches


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return ImageFolderIndex(make_image_folder(tmp_path_factory.mktemp("decode_data")))


def _loader(index, backend: str, multi_crop: bool) -> TrainLoader:
    options = {"views": (CropView(16, (0.3, 1.0)), CropView(8, (0.1, 0.5))), "color_distortion": True} \
        if multi_crop else {}
    loader = TrainLoader(index, 16, BATCH, backend=backend, num_threads=1, seed=5, cache_in_memory=False, **options)
    loader.set_epoch(3)
    loader.set_order(np.random.default_rng(1).permutation(len(index)))
    return loader


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rows(batches) -> list[tuple]:
    return [(batch.number, batch.indices.tolist(), [view.clone() for view in (batch.views or [batch.images])])
            for batch in batches]


def _assert_same(left: list[tuple], right: list[tuple]) -> None:
    assert [(number, indices) for number, indices, _ in left] == [(number, indices) for number, indices, _ in right]
    for (_, _, left_views), (_, _, right_views) in zip(left, right):
        assert all(torch.equal(a, b) for a, b in zip(left_views, right_views, strict=True))


@pytest.mark.parametrize("multi_crop", [False, True], ids=["one crop", "multi-crop + colour"])
def test_a_loader_started_at_batch_n_decodes_only_what_it_hands_out(index, multi_crop, monkeypatch):
    full = _rows(_loader(index, "torchvision", multi_crop))
    assert [number for number, _, _ in full] == list(range(6))
    start = random.Random().randint(1, 5)
    print(f"starting at batch {start}")

    decoded, probed = [], []
    decode, probe = torchvision_backend.decode, loaders_module.probe
    monkeypatch.setattr(torchvision_backend, "decode", lambda header, *a: decoded.append(_digest(header.data)) or
                        decode(header, *a))
    monkeypatch.setattr(loaders_module, "probe", lambda path, *a: probed.append(path) or probe(path, *a))
    loader = _loader(index, "torchvision", multi_crop)
    loader.start_at(start)
    resumed = _rows(loader)

    _assert_same(resumed, full[start:])
    handed_out = [index.paths[i] for _, indices, _ in resumed for i in indices]
    assert sorted(decoded) == sorted(_digest(Path(path).read_bytes()) for path in handed_out)  # once per file of the trained batches, multi-crop included
    assert sorted(probed) == sorted(handed_out)
    assert [number for number, _, _ in _rows(loader)] == list(range(6))  # start_at holds for one iteration only


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
def test_dali_batches_from_batch_n_equal_an_iteration_from_the_start(index):
    full = _rows(_loader(index, "dali", multi_crop=False))
    start = random.Random().randint(1, 5)
    loader = _loader(index, "dali", multi_crop=False)
    loader.start_at(start)
    _assert_same(_rows(loader), full[start:])


def test_start_at_refuses_a_negative_batch(index):
    with pytest.raises(ValueError, match="batch_number must be >= 0, got -1"):
        _loader(index, "torchvision", multi_crop=False).start_at(-1)
