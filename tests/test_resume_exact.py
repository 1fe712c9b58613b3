"""Exact multi-process resume: a torchrun 2-process gloo run stopped mid-epoch (SIGTERM to rank 1 only, at a random
step) and resumed ends identical to an uninterrupted one: weights, optimizers, algorithm state, assignments,
every rank's random generators, and the log less its times."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from pydc.utils.checkpoint import CheckpointError
from pydc.utils.preemption import TEST_HOOK
from pydc.utils.resume import restore_rank_rng
from tests.test_preemption import _without_times
from tests.test_train import REPO, TINY_FLAGS, run_cli, tiny_data  # noqa: F401 (fixture)
from tests.test_train_resume import _assert_same_state

STEPS = 2 * 3  # 2 epochs of 72 images in batches of 12, shared by 2 ranks
FLAGS = ["--deterministic", "--checkpoint-steps", "0", "--no-plots", "--no-eval", *TINY_FLAGS]


def _torchrun(output, data, *flags, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pydc.train",
               "--data", str(data), "--output", str(output), *FLAGS, *flags]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


def _log(output) -> list[dict]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_run_stopped_mid_epoch_resumes_exactly(tiny_data, tmp_path):  # noqa: F811
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    result = _torchrun(reference, tiny_data)
    assert result.returncode == 0, result.stderr[-4000:]

    stop_after = random.Random().randint(1, STEPS - 1)
    print(f"SIGTERM to rank 1 after global step {stop_after}")
    # Only rank 1 gets the signal: rank 0 must stop at the same step (else it would hang in its next collective).
    result = _torchrun(stopped, tiny_data, env_extra={TEST_HOOK: f"{stop_after}:TERM:1"})
    assert result.returncode != 0, "the run ended without being preempted"
    assert "preempted: SIGTERM received" in result.stderr, result.stderr[-4000:]
    checkpoint = torch.load(stopped / "checkpoint.pt", weights_only=True)
    assert (checkpoint["global_step"], checkpoint["world_size"], len(checkpoint["rng_ranks"])) == (stop_after, 2, 2)
    assert checkpoint["step"] != 0  # mid-epoch

    # A mid-epoch checkpoint of 2 processes is refused by 1, with a message saying why.
    single = run_cli("pydc.train", "--data", tiny_data, "--output", tmp_path / "single", *FLAGS, "--resume",
                     stopped / "checkpoint.pt", check=False)
    assert single.returncode == 2 and "a mid-epoch resume needs the same number of processes" in single.stderr

    result = _torchrun(stopped, tiny_data, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-4000:]
    assert [record["global_step"] for record in _log(stopped) if record.get("event") == "resumed"] == [stop_after]

    resumed = torch.load(stopped / "checkpoint.pt", weights_only=True)
    uninterrupted = torch.load(reference / "checkpoint.pt", weights_only=True)
    for key in ("model", "optimizer", "head_optimizer", "algorithm", "assignments", "previous_assignments",
                "global_step", "rng_ranks"):
        _assert_same_state(resumed[key], uninterrupted[key], key)
    assert _without_times(_log(stopped)) == _without_times(_log(reference))


def test_rank_generators_under_another_world_size():
    """An epoch's checkpoint under another world size: each rank reseeded from (seed, rank, epoch), said so;
    a mid-epoch one refused with the reason."""
    saved = {"world_size": 2, "epoch": 3, "step": 0, "rng": None, "rng_ranks": [None, None]}
    draws = []
    for _ in range(2):
        note = restore_rank_rng(saved, seed=7, rank=0, world_size=1, path="run/checkpoint.pt")
        draws.append((torch.rand(3), np.random.rand(), random.random()))
    assert "written by 2 process(es), resumed by 1: random generators seeded afresh" in note
    assert torch.equal(draws[0][0], draws[1][0]) and draws[0][1:] == draws[1][1:]
    restore_rank_rng(saved, seed=7, rank=1, world_size=1, path="run/checkpoint.pt")
    assert not torch.equal(torch.rand(3), draws[0][0])  # another rank, other draws
    with pytest.raises(CheckpointError, match=r"written mid-epoch \(epoch 3, step 2\) by 2 process\(es\), but this "
                                              r"run has 1; a mid-epoch resume needs the same number of processes"):
        restore_rank_rng({**saved, "step": 2}, seed=7, rank=0, world_size=1, path="run/checkpoint.pt")
