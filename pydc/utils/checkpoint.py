"""Checkpoints that survive a kill at any moment and load without unpickling arbitrary code.

`save_checkpoint` writes to a temporary file in the same folder, fsyncs it, renames it over the target and
fsyncs the folder, so a reader sees either the old or the new file, never a torn one; a failed write removes
its temporary file and leaves the previous checkpoint as it was (a killed one leaves the temporary file, which
`remove_stale_temporaries` deletes). `atomic_save` is the same write for any object (pydc.export). `load_checkpoint` uses
torch.load(weights_only=True): a checkpoint holds only tensors, numbers, strings and containers of them
(RNG states are stored as tensors and lists for that reason).

Every checkpoint carries `format_version` (FORMAT_VERSION when written; files without it predate the field
and are version 1). A reader refuses a file written by a newer format instead of misreading it.
`peek_checkpoint` opens a file memory-mapped, without reading its tensors, so that --resume is checked
(readable, format, same algorithm/arch/k/crop) before a run reads any data.

Per-epoch copies (--keep-checkpoints N): `keep_epoch_checkpoint` hard-links the just-written checkpoint as
OUTPUT/checkpoints/epoch_NNNN.pt (no second write; a copy where links are not supported) and removes the
oldest beyond N.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch


# Version 1: the layout written by pydc.train since checkpoints exist (model, optimizers, rng, epoch, step ...).
# Version 2: the algorithm's state lies under "algorithm" (version 1, before algorithms were plug-ins, kept it in
# top-level keys such as "memory"; pydc.train maps such checkpoints on load).
FORMAT_VERSION = 2
# Options a checkpoint must share with the run that resumes it (the shapes of its tensors depend on them).
COMPATIBILITY_KEYS = ("algo", "arch", "k", "crop", "stem", "dc_heads", "dc_head_k")
# Options whose default is resolved only once the data is indexed (None while options are validated).
DATA_DEPENDENT_KEYS = ("k",)
# The value an option had before it existed, for checkpoints written then (--stem: the Sobel stem; one
# DeepCluster head).
LEGACY_DEFAULTS = {"stem": "sobel", "dc_heads": 1, "dc_head_k": "same"}
EPOCH_CHECKPOINTS = "checkpoints"
_ELSEWHERE = f"Resume from another checkpoint (e.g. one under {EPOCH_CHECKPOINTS}/) or start afresh"
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or not one of pydc's."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write a pydc.train checkpoint (stamped with FORMAT_VERSION) atomically."""
    return atomic_save({**state, "format_version": FORMAT_VERSION}, path)


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save(obj, path) that leaves either the old file or the complete new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed save_checkpoint(path) left beside `path` (`.NAME.*.tmp`). Call it
    only where no other process writes `path` (pydc.train: rank 0 at start-up)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for temporary in stale:
        temporary.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    return _read(Path(path), map_location=map_location, mmap=False)


def peek_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's dict with its tensors memory-mapped, not read: cheap enough to check options with."""
    return _read(Path(path), map_location="cpu", mmap=True)


def _read(path: Path, map_location, mmap: bool) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a checkpoint.pt written by "
                              f"pydc.train (it lies under the run's --output folder)")
    if not zipfile.is_zipfile(path):  # torch.save's format is a zip archive, its directory at the end
        raise CheckpointError(f"checkpoint {path} cannot be read (not a complete zip archive, the format torch.save "
                              f"writes); it is truncated or corrupt, or not a torch file. {_ELSEWHERE}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: "
                              f"{_first_sentence(error)}); it is truncated or "
                              f"corrupt, or not a torch file. {_ELSEWHERE}") from None
    if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("args"), dict):
        raise CheckpointError(f"checkpoint {path} is a torch file but not a pydc.train checkpoint "
                              f"(expected a dict with 'model' and 'args')")
    version = state.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, newer than this pydc reads "
                              f"(up to {FORMAT_VERSION}); it was written by a newer pydc: resume with that "
                              f"version, or upgrade pydc")
    return state


def _first_sentence(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0][:200] if text else ""


def check_compatible(saved_args: dict, args: dict, path) -> None:
    """Refuse to resume a checkpoint whose tensors were shaped by other options than this run's. An option
    missing on either side (a checkpoint from before it existed, options built by hand) has its old value."""
    saved_args, args = {**LEGACY_DEFAULTS, **saved_args}, {**LEGACY_DEFAULTS, **args}
    for key in COMPATIBILITY_KEYS:
        if args.get(key) is None and key in DATA_DEPENDENT_KEYS:
            continue  # resolved from the data later (options.resolve_data_defaults); train.py checks again then
        if saved_args.get(key) != args.get(key):
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(f"checkpoint {path} was written with {flag} {saved_args.get(key)}, but this "
                                  f"run has {flag} {args.get(key)}; pass the same options to resume")


def epoch_checkpoint_path(output: str | os.PathLike, epoch: int) -> Path:
    return Path(output) / EPOCH_CHECKPOINTS / f"epoch_{epoch:04d}.pt"


def keep_epoch_checkpoint(checkpoint: str | os.PathLike, epoch: int, keep: int) -> Path | None:
    """Keep `checkpoint` (just written at the end of `epoch`) as checkpoints/epoch_NNNN.pt beside it, and only
    the `keep` newest such files; keep=0 keeps none. Returns the epoch file's path (None when keep=0)."""
    checkpoint = Path(checkpoint)
    folder = checkpoint.parent / EPOCH_CHECKPOINTS
    if keep <= 0:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    target = epoch_checkpoint_path(checkpoint.parent, epoch)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(handle)
    os.unlink(temporary)
    try:
        # save_checkpoint replaces checkpoint.pt by a new file (a new inode), so a hard link keeps this
        # epoch's bytes after the next save; linking to a temporary name and renaming keeps it atomic.
        try:
            os.link(checkpoint, temporary)
        except OSError:  # no hard links on this file system (or across devices): a copy
            shutil.copyfile(checkpoint, temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    epochs = sorted((int(match.group(1)), entry) for entry in folder.iterdir()
                    if (match := _EPOCH_FILE.match(entry.name)))
    for _, stale in epochs[:-keep]:
        stale.unlink(missing_ok=True)
    return target


def capture_rng_state() -> dict:
    """Every random generator a training step may draw from, in a weights_only-loadable form."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "position": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "python": [python_state[0], list(python_state[1]), python_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in saved])
