"""Preemption: SIGTERM at a random step -> checkpoint, `preempted` event, exit status 143; `--resume auto` then
ends bit-identical to an uninterrupted run (weights, optimizer, assignments, log records less their times)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading

import numpy as np
import torch

from pydc.utils.preemption import TEST_HOOK, PreemptionGuard, exit_status
from tests.test_train import REPO, TINY_FLAGS, deepcluster_run, read_log, run_cli, tiny_data  # noqa: F401 (fixtures)
from tests.test_train_resume import TOTAL_STEPS, _assert_same_state

TIMES = ("time", "images_per_s")  # wall-clock fields of a record: never equal between two runs


def _without_times(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if not key.startswith(TIMES)} for record in records
            if record.get("event") in (None, "final")]


def test_sigterm_at_a_random_step_checkpoints_and_resume_is_exact(deepcluster_run, tiny_data, tmp_path):  # noqa: F811
    stop_after = random.Random().randint(1, TOTAL_STEPS - 1)
    print(f"SIGTERM after global step {stop_after}")
    # No --checkpoint-steps: the only mid-epoch checkpoint is the one the preemption writes.
    flags = ["--data", tiny_data, "--output", tmp_path, "--deterministic", "--checkpoint-steps", "0",
             "--keep-checkpoints", "2", *TINY_FLAGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", TEST_HOOK: str(stop_after)}
    stopped = subprocess.run([sys.executable, "-m", "pydc.train", *map(str, flags)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert stopped.returncode == exit_status(signal.SIGTERM) == 143, stopped.stderr[-3000:]
    assert "pydc.train: preempted: SIGTERM received" in stopped.stderr and "Traceback" not in stopped.stderr
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["global_step"] == stop_after
    events = [record for record in read_log(tmp_path) if record.get("event") == "preempted"]
    assert [(event["signal"], event["global_step"]) for event in events] == [("SIGTERM", stop_after)]
    assert not any(record.get("event") == "final" for record in read_log(tmp_path))

    stale = tmp_path / ".checkpoint.pt.killedwrite.tmp"  # what a write killed midway leaves
    stale.write_bytes(b"partial")
    resumed_run = run_cli("pydc.train", *flags, "--resume", "auto")
    assert not stale.exists()
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["epoch_0000.pt", "epoch_0001.pt"]
    assert f"resumed from {tmp_path / 'checkpoint.pt'}" in resumed_run.stderr
    log = read_log(tmp_path)
    resumed = [record for record in log if record.get("event") == "resumed"]
    assert [record["global_step"] for record in resumed] == [stop_after]  # resumed there, not restarted
    assert [record.get("event") for record in log].count("preempted") == 1  # the history is kept

    final = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    uninterrupted = torch.load(deepcluster_run / "checkpoint.pt", weights_only=True)
    for key in ("model", "optimizer", "head_optimizer", "algorithm", "assignments", "previous_assignments", "epoch",
                "step", "global_step"):
        _assert_same_state(final[key], uninterrupted[key], key)
    for epoch in (0, 1):
        name = f"assignments/epoch_{epoch:03d}.npy"
        np.testing.assert_array_equal(np.load(tmp_path / name), np.load(deepcluster_run / name))
    assert _without_times(log) == _without_times(read_log(deepcluster_run))


def test_guard_turns_a_signal_into_a_flag_and_restores_the_handlers():
    before = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1)}
    with PreemptionGuard() as guard:
        assert guard.stop_requested() is None
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGTERM)  # the first signal is the one reported
        assert guard.stop_requested() == signal.SIGUSR1
    assert {number: signal.getsignal(number) for number in before} == before


def test_guard_outside_the_main_thread_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def enter():
        with PreemptionGuard() as guard:
            seen.append(signal.getsignal(signal.SIGTERM))
            seen.append(guard.stop_requested())

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == [before, None]
