"""Resuming pydc.train from a checkpoint: each rank's random generators, and the algorithm's state (also from a
format-1 checkpoint, written before algorithms were plug-ins)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pydc.utils.checkpoint import FORMAT_VERSION, CheckpointError, restore_rng_state


def restore_rank_rng(saved: dict, seed: int, rank: int, world_size: int, path) -> str:
    """Give this rank back its own random generators; returns a note for the resume message ("" when exact).

    A mid-epoch checkpoint resumes only under the world size that wrote it (each rank's step counts batches of its
    share of the epoch's order). An epoch's checkpoint may resume under another world size: the data order and
    the model are world-size independent there, but the ranks' generators are then seeded afresh from (--seed,
    rank, epoch), so the run is not bit-identical to one that kept its world size."""
    saved_world_size = saved.get("world_size", 1)
    ranks = saved.get("rng_ranks")
    if saved_world_size == world_size:
        if ranks is None and world_size > 1:  # written before per-rank states: only rank 0's was kept
            restore_rng_state(saved["rng"])
            return " (an older checkpoint with rank 0's random state only: other ranks are not exact)"
        restore_rng_state(ranks[rank] if ranks is not None else saved["rng"])
        return ""
    if saved["step"] != 0:
        raise CheckpointError(f"checkpoint {path} was written mid-epoch (epoch {saved['epoch']}, step "
                              f"{saved['step']}) by {saved_world_size} process(es), but this run has {world_size}; "
                              f"a mid-epoch resume needs the same number of processes. Resume with "
                              f"{saved_world_size}, or from an epoch's checkpoint (--keep-checkpoints keeps them "
                              f"under {Path(path).parent / 'checkpoints'})")
    entropy = [seed % 2**32, rank, saved["epoch"]]
    torch.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
    np.random.seed(np.random.SeedSequence(entropy).generate_state(1))
    random.seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
    return (f" (written by {saved_world_size} process(es), resumed by {world_size}: random generators seeded "
            f"afresh, not bit-identical to an uninterrupted run)")


def algorithm_state(saved: dict, algorithm_class, path) -> dict:
    """The algorithm's state from a checkpoint of this format, or mapped from a format-1 checkpoint."""
    version = saved.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {version}, written by a newer pydc; this pydc reads "
                              f"formats 1 to {FORMAT_VERSION}. Upgrade pydc to resume it")
    if version == FORMAT_VERSION:
        return saved["algorithm"]
    try:
        return algorithm_class.state_from_legacy_checkpoint(saved)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} has format 1 (written by pydc before algorithms were plug-ins) "
                              f"and its --algo {algorithm_class.name} state cannot be recovered from it ({error}); "
                              f"start afresh or resume with the pydc that wrote it") from None
