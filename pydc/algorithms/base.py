"""The interface between the generic trainer (pydc/train.py) and one training algorithm.

The trainer owns set-up, data, the step loop (forward via `loss`, backward, both optimizers), checkpoints,
logs and the final evaluation. An algorithm owns everything that differs between DeepCluster, ODC and
DeepCluster-v2: its network on top of the backbone, what happens at the start of an epoch, the order in which
the epoch visits the images, the loss of a batch, what happens after each step, the cluster assignments, and
the state it needs to resume. One epoch, as the trainer drives it:

    if the epoch starts afresh (not resumed mid-epoch):
        record = algorithm.begin_epoch(epoch, loaders)            # clustering, memory init, ... (timed fields)
    order = algorithm.order(epoch, rank, world_size)              # this rank's sample order
    if the epoch starts afresh and algorithm.reset_head_optimizer: a new head optimizer
    for each batch (from the resumed step on):
        loss = algorithm.loss(training_model, batch)              # training_model may be DDP-wrapped
        backward, optimizer steps
        sums = algorithm.after_step(global_step)                  # numbers summed into the epoch's totals
    record.update(algorithm.epoch_record(totals))
    checkpoint: algorithm.state_dict(), algorithm.assignments()

`assignments()` is every image's current cluster (int64 (N,) on the CPU), the one the logs, plots and NMI
scores describe. Algorithm-specific options stay in pydc/utils/options.py; an algorithm reads what it needs
from `args` in its constructor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pydc.data.geometry import CropView


class TrainingError(RuntimeError):
    """A problem the user can fix (bad data, bad options, diverged training): reported in one message."""


@dataclass
class Loaders:
    """What `begin_epoch` may read: the feature loader (every image of this rank's shard once, centre crops,
    index order) and the training loader (its order and epoch are set again by the trainer afterwards)."""

    feature: object
    train: object
    num_images: int
    device: torch.device


class Algorithm:
    """Base class: the interface, documented, with the defaults most algorithms want.

    Subclasses set `name` (the --algo value) and implement `build`, `begin_epoch`, `order`, `loss`,
    `assignments`, `state_dict` and `load_state_dict`; the other methods have working defaults.
    """

    name: str = ""
    # True: the trainer makes a fresh head optimizer at the start of every epoch that starts afresh
    # (DeepCluster, whose top layer is re-initialised there); a resumed epoch keeps the loaded one.
    reset_head_optimizer: bool = False

    def __init__(self, args, num_images: int, device: torch.device):
        self.args = args
        self.num_images = int(num_images)
        self.device = device
        self.model: nn.Module | None = None

    # --- set-up -----------------------------------------------------------------------------------------------
    def build(self, backbone: nn.Module) -> tuple[nn.Module, list, list]:
        """(model, body parameters, head parameters) around `backbone`. The body gets SGD with --momentum, the
        head SGD without momentum; an empty head list means no head optimizer. Sets `self.model`."""
        raise NotImplementedError

    def train_views(self) -> tuple[CropView, ...] | None:
        """The training loader's crops (multi-crop), or None for one RandomResizedCrop(--crop, --crop-scale)."""
        return None

    def color_distortion(self) -> float:
        """The strength of the colour jitter + random grayscale the training loader applies to the crops
        (SwAV's s, pydc.data.color); 0: none."""
        return 0.0

    # --- per epoch --------------------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int, loaders: Loaders) -> dict:
        """Work before the epoch's first step (not run when an epoch is resumed mid-way); returns record fields."""
        raise NotImplementedError

    def order(self, epoch: int, rank: int, world_size: int) -> list[int]:
        """This rank's sample indices for the epoch, a deterministic function of (seed, epoch, state)."""
        raise NotImplementedError

    def epoch_record(self, totals: dict) -> dict:
        """Fields this algorithm adds to the epoch's log record, from the epoch's summed stats."""
        return {}

    # --- per step ---------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The loss of `batch` (pydc.data.Batch) through `model` (this algorithm's model, maybe DDP-wrapped)."""
        raise NotImplementedError

    def after_step(self, global_step: int) -> dict:
        """Work after the optimizer steps; `global_step` counts the steps taken, this one included. Returns
        numbers to sum into the epoch's stats (which `epoch_record` then sees)."""
        return {}

    # --- state ------------------------------------------------------------------------------------------------
    def assignments(self) -> torch.Tensor | None:
        """Every image's current cluster, int64 (N,) on the CPU (None before the first clustering)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Tensors, numbers and containers of them: what `load_state_dict` needs to resume exactly."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    @classmethod
    def state_from_legacy_checkpoint(cls, saved: dict) -> dict:
        """This algorithm's `state_dict` recovered from a checkpoint of format 1 (before algorithms were
        plug-ins), whose algorithm state lay in top-level keys. Raise ValueError when it cannot be."""
        raise ValueError(f"--algo {cls.name} did not exist before checkpoint format 2")


# --- helpers shared by several algorithms ----------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int) -> int:
    """One seed per (run seed, epoch): k-means initialisation, shuffles."""
    return seed * 1_000_003 + epoch


def shuffled_shard(num_images: int, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """A permutation of all images seeded by (seed, epoch), padded by its head to a multiple of world_size;
    rank r takes the r-th contiguous piece."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    permutation = torch.randperm(num_images, generator=generator)
    per_rank = math.ceil(num_images / world_size)
    permutation = torch.cat([permutation, permutation[: per_rank * world_size - num_images]])
    return permutation[rank * per_rank:(rank + 1) * per_rank].tolist()
