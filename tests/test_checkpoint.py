"""Checkpoint safety: a write that fails or is killed midway leaves the previous checkpoint loadable; format
versions; per-epoch copies (--keep-checkpoints)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from pydc.utils import checkpoint as checkpoint_module
from pydc.utils.checkpoint import (FORMAT_VERSION, CheckpointError, check_compatible, epoch_checkpoint_path,
                                   keep_epoch_checkpoint, load_checkpoint, peek_checkpoint, remove_stale_temporaries,
                                   save_checkpoint)
from tests.test_train import REPO


def _state(value: float, size: int = 1000) -> dict:
    return {"model": {"weight": torch.full((size,), value)}, "args": {"algo": "deepcluster", "arch": "small", "k": 3,
                                                                     "crop": 16}, "epoch": int(value)}


def test_a_write_failing_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_state(1.0), path)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_fail(state, stream):
        real_save(state, stream)
        stream.truncate(stream.tell() // 2)  # half the bytes made it, then the disk filled up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(_state(2.0), path)
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["model"]["weight"], torch.full((1000,), 1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # the temporary file is gone


_KILLED_WRITER = """
import sys, time, torch
from pydc.utils import checkpoint
real_save = torch.save
def slow_save(state, stream):
    real_save(state, stream)
    stream.seek(0); stream.truncate(1000); stream.flush()  # half written ...
    print("writing", flush=True)
    time.sleep(60)                                          # ... when the kill comes
checkpoint.torch.save = slow_save
checkpoint.save_checkpoint({"model": {"w": torch.full((100000,), 2.0)}, "args": {}}, sys.argv[1])
"""


def test_a_writer_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_state(1.0), path)
    before = path.read_bytes()
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt"]
    assert all(name.startswith(".checkpoint.pt.") and name.endswith(".tmp") for name in leftovers), leftovers
    assert [p.name for p in remove_stale_temporaries(path)] == sorted(leftovers)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_format_version_written_and_newer_ones_refused(tmp_path):
    path = save_checkpoint(_state(1.0), tmp_path / "checkpoint.pt")
    assert load_checkpoint(path)["format_version"] == FORMAT_VERSION
    assert peek_checkpoint(path)["format_version"] == FORMAT_VERSION
    older = tmp_path / "older.pt"  # written before the field existed: version 1
    torch.save(_state(1.0), older)
    assert load_checkpoint(older)["epoch"] == 1
    newer = tmp_path / "newer.pt"
    torch.save({**_state(1.0), "format_version": FORMAT_VERSION + 1}, newer)
    for read in (load_checkpoint, peek_checkpoint):
        with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}, newer than this pydc"):
            read(newer)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_gives_one_clear_error(tmp_path, damage):
    path = save_checkpoint(_state(1.0), tmp_path / "checkpoint.pt")
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    for read in (load_checkpoint, peek_checkpoint):
        with pytest.raises(CheckpointError, match="cannot be read .* truncated or corrupt") as error:
            read(path)
        assert "\n" not in str(error.value)


def test_peek_reads_what_load_reads(tmp_path):
    path = save_checkpoint(_state(3.0), tmp_path / "checkpoint.pt")
    peeked, loaded = peek_checkpoint(path), load_checkpoint(path)
    assert peeked["args"] == loaded["args"] and torch.equal(peeked["model"]["weight"], loaded["model"]["weight"])


def test_check_compatible_names_the_differing_option():
    saved = {**_state(1.0)["args"], "stem": "rgb"}
    check_compatible(saved, dict(saved), "x.pt")
    with pytest.raises(CheckpointError, match="written with --k 3, but this run has --k 5"):
        check_compatible(saved, {**saved, "k": 5}, "x.pt")
    with pytest.raises(CheckpointError, match="written with --stem rgb, but this run has --stem sobel"):
        check_compatible(saved, {**saved, "stem": "sobel"}, "x.pt")


def test_check_compatible_reads_a_checkpoint_from_before_stem_as_sobel():
    legacy = {key: value for key, value in _state(1.0)["args"].items() if key != "stem"}
    check_compatible(legacy, {**legacy, "stem": "sobel"}, "x.pt")
    with pytest.raises(CheckpointError, match="written with --stem sobel, but this run has --stem rgb"):
        check_compatible(legacy, {**legacy, "stem": "rgb"}, "x.pt")


def test_keep_epoch_checkpoints_keeps_the_last_n(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for epoch in range(5):
        save_checkpoint(_state(float(epoch)), path)
        kept = keep_epoch_checkpoint(path, epoch, keep=2)
        assert kept == epoch_checkpoint_path(tmp_path, epoch)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["epoch_0003.pt", "epoch_0004.pt"]
    for epoch in (3, 4):  # each holds its own epoch, though checkpoint.pt was rewritten since
        assert load_checkpoint(epoch_checkpoint_path(tmp_path, epoch))["epoch"] == epoch
    assert keep_epoch_checkpoint(path, 5, keep=0) is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == files


def test_keep_epoch_checkpoints_copies_where_links_fail(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(checkpoint_module.os, "link", no_links)
    path = save_checkpoint(_state(7.0), tmp_path / "checkpoint.pt")
    kept = keep_epoch_checkpoint(path, 7, keep=1)
    assert kept.read_bytes() == path.read_bytes() and kept.stat().st_ino != path.stat().st_ino
    assert sorted(p.name for p in kept.parent.iterdir()) == ["epoch_0007.pt"]
