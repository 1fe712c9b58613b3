"""Checkpoints that survive a kill at any moment and load without unpickling arbitrary code.

`save_checkpoint` writes to a temporary file in the same folder, fsyncs it, renames it over the target and
fsyncs the folder, so a reader sees either the old or the new file, never a torn one. `load_checkpoint` uses
torch.load(weights_only=True): a checkpoint holds only tensors, numbers, strings and containers of them
(RNG states are stored as tensors and lists for that reason).
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or not one of pydc's."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
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


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a checkpoint.pt written by "
                              f"pydc.train (it lies under the run's --output folder)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {str(error)[:200]}); "
                              f"it is truncated or corrupt, or not a torch file. Resume from another "
                              f"checkpoint (e.g. the previous epoch's) or start afresh") from None
    if not isinstance(state, dict) or "model" not in state or "args" not in state:
        raise CheckpointError(f"checkpoint {path} is a torch file but not a pydc.train checkpoint "
                              f"(expected a dict with 'model' and 'args')")
    return state


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
