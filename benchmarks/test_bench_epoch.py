"""One whole training epoch, end to end: images/s and the time split (feature pass, PCA, k-means, training).

CPU: DeepCluster and ODC with the `small` net on the bundled digits (1797 32x32 images), as `make train` runs.
CUDA: ResNet-50 on synthetic JPEGs (1024 photo-sized 500x375 images, 224 crops, batch 256, k = 1000,
PCA 256), the ImageNet configuration on a slice of data. Each is one timed round (an epoch is long); the log
record's split goes into extra_info and the --benchmark-json output.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.conftest import DEVICES
from pydc.data import synthetic_jpegs
from pydc.train import train
from pydc.utils.options import parse_args

SPLIT_KEYS = ("images_per_s", "time_features", "time_pca", "time_kmeans", "time_train", "time_epoch")


def _run_epoch(benchmark, flags, output):
    args = parse_args([*flags, "--epochs", "1", "--no-eval", "--no-plots", "--checkpoint-steps", "0",
                       "--output", str(output)])
    benchmark.pedantic(lambda: train(args), rounds=1, iterations=1)
    record = json.loads((output / "log.jsonl").read_text().splitlines()[0])
    for key in SPLIT_KEYS:
        if key in record:
            benchmark.extra_info[key] = record[key]
    print(json.dumps({key: record.get(key) for key in SPLIT_KEYS}))
    return record


@pytest.mark.parametrize("algo", ["deepcluster", "odc"])
def test_epoch_digits_cpu(benchmark, tmp_path, algo):
    benchmark.group = f"epoch {algo} small digits cpu"
    record = _run_epoch(benchmark, ["--algo", algo, "--device", "cpu"], tmp_path)
    assert record["images_per_s"] > 0


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_epoch_resnet50_synthetic_jpegs_cuda(benchmark, tmp_path):
    benchmark.group = "epoch deepcluster resnet50 synthetic-jpeg cuda"
    synthetic_jpegs(tmp_path / "images", 1024)  # photo-sized (500x375) JPEGs, no class folders
    record = _run_epoch(benchmark, ["--arch", "resnet50", "--data", str(tmp_path / "images"), "--k", "1000",
                                    "--pca-dim", "256", "--batch-size", "256", "--workers", "8", "--device", "cuda"],
                        tmp_path / "run")
    assert record["images_per_s"] > 0
