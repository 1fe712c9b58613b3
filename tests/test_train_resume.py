"""Exact resume: SIGKILL a deterministic CPU run at a random step, resume it, and end where an uninterrupted
run ends (same weights, optimizer state and assignments of every epoch)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from tests.test_train import REPO, TINY_FLAGS, deepcluster_run, run_cli, tiny_data  # noqa: F401 (fixtures)

STEPS_PER_EPOCH = 6  # 72 images / batch 12
TOTAL_STEPS = 2 * STEPS_PER_EPOCH


def _global_step(checkpoint) -> int:
    try:
        return int(torch.load(checkpoint, weights_only=True)["global_step"])
    except Exception:  # not written yet
        return -1


def _assert_same_state(left: dict, right: dict, path: str = "") -> None:
    assert type(left) is type(right), path
    if isinstance(left, dict):
        assert set(left) == set(right), path
        for key in left:
            _assert_same_state(left[key], right[key], f"{path}.{key}")
    elif isinstance(left, (list, tuple)):
        assert len(left) == len(right), path
        for i, (a, b) in enumerate(zip(left, right)):
            _assert_same_state(a, b, f"{path}[{i}]")
    elif isinstance(left, torch.Tensor):
        difference = float((left.double() - right.double()).abs().max()) if left.numel() else 0.0
        assert torch.equal(left, right), f"{path} differs (max |diff| {difference})"
    elif isinstance(left, float) and np.isnan(left):
        assert np.isnan(right), path
    else:
        assert left == right, path


def test_sigkill_at_a_random_step_then_resume_is_exact(deepcluster_run, tiny_data, tmp_path):  # noqa: F811
    kill_after = random.Random().randint(1, TOTAL_STEPS - 3)
    print(f"killing after global step {kill_after}")
    flags = ["--data", tiny_data, "--output", tmp_path, "--deterministic", "--checkpoint-steps", "1", *TINY_FLAGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, "-m", "pydc.train", *map(str, flags)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if checkpoint.exists() and _global_step(checkpoint) >= kill_after:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = _global_step(checkpoint)
    assert 0 < killed_at < TOTAL_STEPS

    run_cli("pydc.train", *flags, "--resume", checkpoint)

    resumed = torch.load(checkpoint, weights_only=True)
    uninterrupted = torch.load(deepcluster_run / "checkpoint.pt", weights_only=True)
    for key in ("model", "optimizer", "head_optimizer", "assignments", "previous_assignments", "epoch", "step",
                "global_step"):
        _assert_same_state(resumed[key], uninterrupted[key], key)
    for epoch in (0, 1):
        name = f"assignments/epoch_{epoch:03d}.npy"
        np.testing.assert_array_equal(np.load(tmp_path / name), np.load(deepcluster_run / name))
    log_epochs = [line for line in (tmp_path / "log.jsonl").read_text().splitlines() if '"event"' not in line]
    assert len(log_epochs) == 2  # the resumed run replaced, not duplicated, the interrupted epoch's record
