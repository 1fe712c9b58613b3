"""torchrun --nproc_per_node=2 with the gloo backend on the CPU: the run completes, every rank holds the same
assignments (DeepCluster: labels broadcast from rank 0; ODC: the memory all-gathers every update)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_train import REPO, TINY_FLAGS, deepcluster_run, tiny_data  # noqa: F401 (fixtures)


def _torchrun(output, data, *flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pydc.train",
               "--data", str(data), "--output", str(output), "--no-plots", *TINY_FLAGS, *flags]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["event"] == "final" and final["world_size"] == 2 and final["ranks_agree"] is True
    rank0 = np.load(output / "assignments" / "final.rank0.npy")
    rank1 = np.load(output / "assignments" / "final.rank1.npy")
    assert rank0.shape == (72,)
    np.testing.assert_array_equal(rank0, rank1)
    np.testing.assert_array_equal(rank0, np.load(output / "assignments" / "epoch_001.npy"))
    return records


def test_torchrun_two_ranks_deepcluster(deepcluster_run, tiny_data, tmp_path):  # noqa: F811
    """Two ranks agree, and their first clustering is the one-process run's (same seed, --deterministic).

    Only epoch 0's clustering is compared: it is computed before any training step, from the untrained network
    (rank 0 seeds as a single process does), so the two runs must agree exactly unless the ranks' feature
    shards are gathered in the wrong order. Later epochs legitimately differ: with two ranks each trains on its
    own half of every epoch's order, with its own augmentation seed, and the gradients are averaged.
    """
    records = _torchrun(tmp_path, tiny_data, "--deterministic")
    assert [r["epoch"] for r in records if "event" not in r] == [0, 1]
    np.testing.assert_array_equal(np.load(tmp_path / "assignments" / "epoch_000.npy"),
                                  np.load(deepcluster_run / "assignments" / "epoch_000.npy"))


@pytest.mark.slow
def test_torchrun_two_ranks_odc(tiny_data, tmp_path):  # noqa: F811
    _torchrun(tmp_path, tiny_data, "--algo", "odc", "--odc-min-cluster", "4", "--no-eval")
