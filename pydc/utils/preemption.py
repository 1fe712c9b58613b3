"""Preemption: on SIGTERM or SIGUSR1 a run finishes its current step, checkpoints and exits.

Clusters preempt jobs with a signal and a few seconds' grace: SLURM sends SIGTERM (or SIGUSR1 ahead of time with
`--signal=USR1@SECONDS`), Kubernetes sends SIGTERM. `PreemptionGuard` (a context manager around pydc.train's
epochs) turns either signal into a flag instead of the default death; the trainer asks `stop_requested()` after
every step, and when it is true writes a checkpoint, logs a `preempted` event and raises `Preempted`, which
pydc.train.main turns into the exit status 128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1: what a
shell reports for a process killed by that signal, so schedulers that requeue on it still do).
`--resume auto` then continues from that checkpoint.

Handlers are installed only from the main thread (Python allows no other) and the previous ones are restored
on exit. Under torchrun the ranks must stop at the same step (a checkpoint is written by rank 0 for all, and a
rank that left early would hang the others in their next collective): `stop_requested` all-reduces the flag
(MAX of one integer) every step. That is one tiny collective per step next to DDP's gradient all-reduce; a
signal sent to only one rank (a scheduler usually signals all) stops every rank at the same step.

For tests, PYDC_TEST_SIGNAL_AT_STEP=S[:NAME[:RANK]] makes the process (only rank RANK's, when given) send
itself SIGNAME (default TERM) right after global step S, so a test can preempt a run at an exact step.
"""

from __future__ import annotations

import os
import signal
import threading

import torch

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
TEST_HOOK = "PYDC_TEST_SIGNAL_AT_STEP"


class Preempted(Exception):
    """The run stopped on a preemption signal after writing a checkpoint."""

    def __init__(self, signal_number: int, message: str):
        super().__init__(message)
        self.signal_number = signal_number

    @property
    def exit_status(self) -> int:
        return exit_status(self.signal_number)


def exit_status(signal_number: int) -> int:
    return 128 + int(signal_number)


class PreemptionGuard:
    """Within `with`: SIGTERM/SIGUSR1 set a flag (the first one received is kept) instead of killing the process."""

    def __init__(self, device: torch.device | str = "cpu", distributed: bool = False, rank: int = 0):
        self.device = torch.device(device)
        self.distributed = distributed
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._test_step, self._test_signal, test_rank = _test_hook()
        if test_rank is not None and test_rank != rank:
            self._test_step = None

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._on_signal)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _on_signal(self, number, frame) -> None:
        if self.received is None:
            self.received = number

    def after_step(self, global_step: int) -> None:
        """The test hook: send the chosen signal to this process after global step S."""
        if self._test_step is not None and global_step == self._test_step:
            signal.raise_signal(self._test_signal)

    def stop_requested(self) -> int | None:
        """The signal number every rank stops on, or None to go on; collective under torchrun."""
        received = self.received
        if not self.distributed:
            return received
        flag = torch.tensor([0 if received is None else int(received)], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None


def _test_hook() -> tuple[int | None, int, int | None]:
    """(step, signal, rank or None for every rank) from PYDC_TEST_SIGNAL_AT_STEP; step None when unset."""
    value = os.environ.get(TEST_HOOK)
    if not value:
        return None, signal.SIGTERM, None
    step, name, rank = (value.split(":") + ["", ""])[:3]
    return int(step), getattr(signal, "SIG" + (name or "TERM")), int(rank) if rank else None
