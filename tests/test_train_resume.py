"""Exact resume: SIGKILL a deterministic CPU run at a seeded step, resume it, and end where an uninterrupted
run ends (same weights, optimizer state and assignments of every epoch). A deterministic restart from scratch
also ends there, so resume is told from restart separately: a perturbed checkpoint must carry its perturbation
into the resumed run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.test_train import REPO, TINY_FLAGS, deepcluster_run, read_log, run_cli, tiny_data  # noqa: F401 (fixtures)

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


# The kill step is drawn from a seeded generator (a failure must reproduce) and lies in epoch 1, mid-epoch: a
# resume then has a partial epoch to finish and an epoch-0 log record to keep.
KILL_AFTER = random.Random(18).randint(STEPS_PER_EPOCH + 1, TOTAL_STEPS - 2)


def kill_during_run(flags: list, checkpoint, kill_after: int) -> int:
    """Start `python -m pydc.train *flags`, SIGKILL it once `checkpoint` records global step >= kill_after;
    returns the global step of the checkpoint the killed run left."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, "-m", "pydc.train", *map(str, flags)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if checkpoint.exists() and _global_step(checkpoint) >= kill_after:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return _global_step(checkpoint)


def test_sigkill_at_a_seeded_step_then_resume_is_exact(deepcluster_run, tiny_data, tmp_path):  # noqa: F811
    flags = ["--data", tiny_data, "--output", tmp_path, "--deterministic", "--checkpoint-steps", "1", *TINY_FLAGS]
    checkpoint = tmp_path / "checkpoint.pt"
    killed_at = kill_during_run(flags, checkpoint, KILL_AFTER)
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


def _legacy(state: dict) -> dict:
    """The checkpoint as pydc wrote it before algorithms were plug-ins (format 1): algorithm state at top level."""
    legacy = {key: value for key, value in state.items() if key not in ("format_version", "algorithm")}
    legacy.update(state["algorithm"])
    legacy["memory"] = None
    return legacy


def test_format_1_checkpoint_resumes_like_format_2(deepcluster_run, tiny_data, tmp_path):  # noqa: F811
    current = torch.load(deepcluster_run / "checkpoint.pt", weights_only=True)
    outputs = {}
    for name, state in (("format2", current), ("format1", _legacy(current))):
        output = tmp_path / name
        output.mkdir()
        torch.save(state, output / "start.pt")
        flags = [flag if flag != "2" else "3" for flag in TINY_FLAGS]  # one more epoch
        run_cli("pydc.train", "--data", tiny_data, "--output", output, "--deterministic", "--no-eval", "--no-plots",
                *flags, "--resume", output / "start.pt")
        outputs[name] = torch.load(output / "checkpoint.pt", weights_only=True)
    assert outputs["format1"]["epoch"] == 3 and outputs["format1"]["format_version"] == 2
    for key in ("model", "optimizer", "head_optimizer", "algorithm", "assignments", "previous_assignments"):
        _assert_same_state(outputs["format1"][key], outputs["format2"][key], key)


def test_checkpoint_of_an_unknown_format_is_refused_with_its_version(deepcluster_run, tiny_data, tmp_path):  # noqa: F811
    state = torch.load(deepcluster_run / "checkpoint.pt", weights_only=True)
    state["format_version"] = 99
    torch.save(state, tmp_path / "future.pt")
    result = run_cli("pydc.train", "--data", tiny_data, "--output", tmp_path, *TINY_FLAGS, "--resume",
                     tmp_path / "future.pt", check=False)
    assert result.returncode == 2
    assert "has format version 99, newer than this pydc reads" in result.stderr

    odc_state = _legacy(state)
    odc_state["args"] = {**odc_state["args"], "algo": "odc"}
    torch.save(odc_state, tmp_path / "odc_without_memory.pt")
    result = run_cli("pydc.train", "--algo", "odc", "--data", tiny_data, "--output", tmp_path, *TINY_FLAGS,
                     "--resume", tmp_path / "odc_without_memory.pt", check=False)
    assert result.returncode == 2
    assert "has format 1 (written by pydc before algorithms were plug-ins)" in result.stderr


def test_resume_carries_a_perturbed_checkpoint_forward(deepcluster_run, tiny_data, tmp_path):  # noqa: F811
    """Resume, not restart: the finished 2-epoch run's checkpoint, perturbed, is resumed for a third epoch. A
    deterministic restart would reproduce everything the exact-resume test compares, so the perturbation is
    what tells them apart: every BatchNorm counter is set to 1000 and every backbone weight gets seeded noise
    as large as the weights themselves. A resumed run counts on from 1000, ends near the perturbed weights
    (one epoch moves them far less than the noise did) and logs epoch 2 only; a restart does none of this."""
    saved = torch.load(deepcluster_run / "checkpoint.pt", weights_only=True)
    generator = torch.Generator().manual_seed(18)
    perturbed = {}
    for name, value in saved["model"].items():
        if name.endswith("num_batches_tracked"):
            perturbed[name] = torch.full_like(value, 1000)
        elif name.startswith("backbone.") and value.is_floating_point() and name.endswith("weight"):
            noise = torch.randn(value.shape, generator=generator, dtype=value.dtype) * value.std().clamp_min(1e-3)
            perturbed[name] = value + noise
        else:
            perturbed[name] = value
    torch.save({**saved, "model": perturbed}, tmp_path / "perturbed.pt")
    output = tmp_path / "run"
    flags = [flag if flag != "2" else "3" for flag in TINY_FLAGS]  # one more epoch
    run_cli("pydc.train", "--data", tiny_data, "--output", output, "--deterministic", "--no-eval", "--no-plots",
            *flags, "--resume", tmp_path / "perturbed.pt")

    resumed = torch.load(output / "checkpoint.pt", weights_only=True)
    epochs = [record["epoch"] for record in read_log(output) if "event" not in record]
    assert epochs == [2], f"the resumed run logged epochs {epochs}; a restart logs [0, 1, 2]"
    steps_per_epoch = saved["global_step"] // 2
    assert resumed["global_step"] == saved["global_step"] + steps_per_epoch
    for name, value in perturbed.items():
        if name.endswith("num_batches_tracked"):
            assert int(resumed["model"][name]) == 1000 + steps_per_epoch, name
    moved = sum(float((resumed["model"][name] - perturbed[name]).norm()) for name in perturbed
                if perturbed[name] is not saved["model"][name] and not name.endswith("num_batches_tracked"))
    noise = sum(float((perturbed[name] - saved["model"][name]).norm()) for name in perturbed
                if perturbed[name] is not saved["model"][name] and not name.endswith("num_batches_tracked"))
    print(f"one resumed epoch moved the weights by {moved:.3f}; the noise was {noise:.3f}")
    assert moved < 0.5 * noise


ODC_FLAGS = ["--algo", "odc", "--odc-min-cluster", "4", "--odc-centroid-interval", "2", "--no-eval", "--no-plots"]


@pytest.mark.slow
def test_odc_sigkill_at_a_seeded_step_then_resume_is_exact(tiny_data, tmp_path):  # noqa: F811
    """ODC keeps state that changes every step (the memory's features and labels, its centroids, updated every
    second step here, and the small-cluster dissolution), so a resume must restore the memory as it was at
    the killed step: the resumed run ends with the uninterrupted run's weights, optimizers and memory."""
    runs = {}
    for name in ("uninterrupted", "killed"):
        runs[name] = [*ODC_FLAGS, "--data", tiny_data, "--output", tmp_path / name, "--deterministic",
                      "--checkpoint-steps", "1", *TINY_FLAGS]
    run_cli("pydc.train", *runs["uninterrupted"])
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    killed_at = kill_during_run(runs["killed"], checkpoint, KILL_AFTER)
    assert 0 < killed_at < TOTAL_STEPS
    run_cli("pydc.train", *runs["killed"], "--resume", checkpoint)

    resumed = torch.load(checkpoint, weights_only=True)
    uninterrupted = torch.load(tmp_path / "uninterrupted" / "checkpoint.pt", weights_only=True)
    assert set(resumed["algorithm"]["memory"]) == set(uninterrupted["algorithm"]["memory"])
    for key in ("model", "optimizer", "head_optimizer", "algorithm", "assignments", "previous_assignments",
                "epoch", "step", "global_step"):
        _assert_same_state(resumed[key], uninterrupted[key], key)
    for epoch in (0, 1):
        name = f"assignments/epoch_{epoch:03d}.npy"
        np.testing.assert_array_equal(np.load(tmp_path / "killed" / name), np.load(tmp_path / "uninterrupted" / name))


# Resuming with another --algo, --arch or --k is refused (status 2, one message naming both values, nothing
# written or created): rows "resume other algo/arch/k" of the reliability table in tests/test_bad_inputs.py.
