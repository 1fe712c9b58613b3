"""The learning-rate schedule: a linear warm-up from 0, then constant or a cosine decay towards 0 at the end.

The rate is a function of the run's progress in epochs (epoch + batch / batches in the epoch) alone, set on every
optimizer before each step, so a resumed run follows the schedule exactly where it stopped, and an optimizer
re-created mid-run (DeepCluster's per-epoch head) starts at the current rate, not the base one. SwAV's recipe
(facebookresearch/swav) is warm-up + cosine; DeepCluster and ODC used a constant rate.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def learning_rate(base: float, progress: float, epochs: int, schedule: str = "constant",
                  warmup_epochs: float = 0.0) -> float:
    """The rate at `progress` epochs into a run of `epochs` (progress in [0, epochs))."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if epochs < 1 or not 0 <= progress <= epochs:
        raise ValueError(f"expected 0 <= progress <= epochs >= 1, got progress {progress} of {epochs} epochs")
    warmup = min(max(warmup_epochs, 0.0), float(epochs))
    if progress < warmup:
        return base * progress / warmup
    if schedule == "constant" or warmup >= epochs:
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / (epochs - warmup)))


def set_learning_rate(optimizers, rate: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = rate
