"""--cluster-on shard under torchrun (gloo, CPU): each rank clusters where its features are (sharded PCA and
k-means, pydc.algorithms.sharded_clustering) and the runs agree with gathering every feature (--cluster-on
gather) at the same world size and seed, and the first clustering with a one-process run's."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.test_train import REPO, TINY_FLAGS, read_log, run_cli, tiny_data  # noqa: F401 (fixture)

DETERMINISTIC = ["--deterministic", "--kmeans-backend", "torch"]


def test_cluster_on_rule_and_option_checks():
    import argparse

    from pydc.algorithms.sharded_clustering import cluster_on_shards
    from pydc.utils.options import parse_args
    from pydc.utils.validate import OptionError, check_values

    assert parse_args([]).cluster_on == "auto"
    cpu = torch.device("cpu")
    # one process: auto gathers whatever the size (there is nothing to shard across); shard is honoured
    assert cluster_on_shards(argparse.Namespace(cluster_on="auto"), 10**18, cpu) is False
    assert cluster_on_shards(argparse.Namespace(cluster_on="gather"), 10**18, cpu) is False
    assert cluster_on_shards(argparse.Namespace(cluster_on="shard"), 0, cpu) is True
    args = parse_args(["--cluster-on", "shard"])
    args.kmeans_backend = "faiss"
    with pytest.raises(OptionError, match="--cluster-on shard"):
        check_values(args)


def test_cluster_shard_one_process_and_nonfinite_rows():
    from pydc.algorithms.sharded_clustering import NonfiniteFeatures, StreamedPCA, cluster_shard
    from pydc.cluster import PCAWhitening, kmeans

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(300, 12, generator=generator) + torch.arange(300).remainder(3).unsqueeze(1) * 4.0
    pca = PCAWhitening(n_components=6)
    stream = StreamedPCA(pca)
    for batch in features.split(64):
        stream(batch)
    labels, timings, centroids = cluster_shard(features, pca, 5, seed=3, niter=10, num_images=300)
    reference = kmeans(PCAWhitening(n_components=6).fit(features).transform(features), 5, niter=10, seed=3,
                       backend="torch")
    assert labels.dtype == torch.int64 and centroids.shape == (5, 6)
    torch.testing.assert_close(labels, reference.labels, rtol=0, atol=0)
    broken = features.clone()
    broken[7, 2] = float("nan")
    stream = StreamedPCA(PCAWhitening(n_components=6))
    stream(broken)
    assert stream.nonfinite_rows == 1
    with pytest.raises(NonfiniteFeatures, match="1 feature rows"):
        cluster_shard(broken, stream.pca, 5, seed=3, niter=10, num_images=300, nonfinite_rows=stream.nonfinite_rows)


def _torchrun(output, data, *flags) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pydc.train",
               "--data", str(data), "--output", str(output), "--no-plots", "--no-eval", *TINY_FLAGS, *DETERMINISTIC,
               *flags]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    records = read_log(output)
    assert records[-1]["event"] == "final" and records[-1]["ranks_agree"] is True
    return records


def _assignments(output, epoch: int) -> np.ndarray:
    return np.load(output / "assignments" / f"epoch_{epoch:03d}.npy")


@pytest.mark.slow
def test_deepcluster_shard_equals_gather(tiny_data, tmp_path):  # noqa: F811
    shard = _torchrun(tmp_path / "shard", tiny_data, "--cluster-on", "shard")
    gather = _torchrun(tmp_path / "gather", tiny_data, "--cluster-on", "gather")
    for epoch in (0, 1):
        labels = _assignments(tmp_path / "shard", epoch)
        assert labels.shape == (72,) and len(np.unique(labels)) > 1
        np.testing.assert_array_equal(labels, _assignments(tmp_path / "gather", epoch))
    epochs = [record for record in shard if "event" not in record]
    for record, reference in zip(epochs, [r for r in gather if "event" not in r]):
        assert record["kmeans_objective"] == pytest.approx(reference["kmeans_objective"], rel=1e-5)
    # the first clustering (same initial weights) equals one process's with the torch backend
    run_cli("pydc.train", "--data", tiny_data, "--output", tmp_path / "one", "--no-plots", "--no-eval", *TINY_FLAGS,
            *DETERMINISTIC, "--epochs", "1", "--cluster-on", "gather")
    np.testing.assert_array_equal(_assignments(tmp_path / "shard", 0), _assignments(tmp_path / "one", 0))


@pytest.mark.slow
def test_deepcluster_heads_shard_equals_gather(tiny_data, tmp_path):  # noqa: F811
    """Every head's clustering (head 0 sharded with the PCA, the others on the whitened shards) equals the
    gathered one, and the nearest-centroid top layer (sums reduced over the ranks) runs sharded."""
    flags = ["--epochs", "1", "--dc-heads", "3", "--dc-head-k", "spread", "--dc-head-init", "centroids"]
    _torchrun(tmp_path / "shard", tiny_data, *flags, "--cluster-on", "shard")
    _torchrun(tmp_path / "gather", tiny_data, *flags, "--cluster-on", "gather")
    shard = torch.load(tmp_path / "shard" / "checkpoint.pt", weights_only=True)["algorithm"]
    gather = torch.load(tmp_path / "gather" / "checkpoint.pt", weights_only=True)["algorithm"]
    assert shard["other_head_assignments"].shape == (2, 72)
    for key in ("assignments", "other_head_assignments"):
        assert len(torch.unique(shard[key])) > 1
        torch.testing.assert_close(shard[key], gather[key], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("init", ["pca", "neck"])
def test_odc_memory_init_shard_equals_gather(tiny_data, tmp_path, init):  # noqa: F811
    flags = ["--algo", "odc", "--odc-min-cluster", "4", "--odc-init", init, "--epochs", "1"]
    shard = _torchrun(tmp_path / "shard", tiny_data, *flags, "--cluster-on", "shard")
    gather = _torchrun(tmp_path / "gather", tiny_data, *flags, "--cluster-on", "gather")
    # epoch 0's record holds the initial k-means; its assignments are the memory's labels after training on
    # them, which start from the initial memory and labels
    assert shard[0]["epoch"] == gather[0]["epoch"] == 0
    # The labels below must be equal; the objectives only agree to float32 rounding, which for the neck init's
    # unit-norm features (distances ~1e-3 from |x|^2 + |c|^2 - 2 x.c, terms ~1) is ~1e-4 relative, and the two
    # paths compute and sum the distances differently.
    assert shard[0]["kmeans_objective"] == pytest.approx(gather[0]["kmeans_objective"], rel=1e-4)
    np.testing.assert_array_equal(_assignments(tmp_path / "shard", 0), _assignments(tmp_path / "gather", 0))


@pytest.mark.slow
def test_dcv2_memory_kmeans_shard_equals_gather(tiny_data, tmp_path):  # noqa: F811
    from tests.test_dcv2 import DCV2_FLAGS

    _torchrun(tmp_path / "shard", tiny_data, *DCV2_FLAGS, "--epochs", "1", "--cluster-on", "shard")
    _torchrun(tmp_path / "gather", tiny_data, *DCV2_FLAGS, "--epochs", "1", "--cluster-on", "gather")
    shard = torch.load(tmp_path / "shard" / "checkpoint.pt", weights_only=True)["algorithm"]
    gather = torch.load(tmp_path / "gather" / "checkpoint.pt", weights_only=True)["algorithm"]
    # every prototype set's labels and centroids of the clustering
    assert len(torch.unique(shard["assignments"])) > 1
    torch.testing.assert_close(shard["assignments"], gather["assignments"], rtol=0, atol=0)
    torch.testing.assert_close(shard["prototypes"], gather["prototypes"], rtol=1e-5, atol=1e-6)
