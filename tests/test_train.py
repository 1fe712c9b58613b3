"""The trainer end to end on a tiny synthetic image folder: outputs, eval/export CLIs, ODC, bad input.

Runs are kept tiny (72 16x16 images, k = 3, a couple of epochs) so the file stays well under two minutes on a
2-core CPU. The shared run (`deepcluster_run`) is deterministic and checkpoints every step; the resume test in
test_train_resume.py compares against it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pydc.train
from pydc.eval import EVAL_PCA_DIM
from pydc.utils.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_FLAGS = ["--epochs", "2", "--k", "3", "--pca-dim", "8", "--crop", "16", "--batch-size", "12", "--threads", "1",
              "--workers", "1", "--device", "cpu", "--seed", "1"]


def make_image_folder(root: Path, per_class: int = 24, size: int = 20, seed: int = 0) -> Path:
    """Three visually distinct classes (horizontal stripes, vertical stripes, a bright square) with noise."""
    generator = np.random.default_rng(seed)
    coordinates = np.arange(size)
    patterns = {
        "horizontal": np.repeat(((coordinates // 3) % 2)[:, None], size, axis=1),
        "vertical": np.repeat(((coordinates // 3) % 2)[None, :], size, axis=0),
        "square": np.pad(np.ones((size // 2, size // 2)), size // 4)[:size, :size],
    }
    for name, pattern in patterns.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shifted = np.roll(pattern, generator.integers(0, 4, size=2), axis=(0, 1))
            grey = np.clip(shifted * 180 + generator.normal(40, 25, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(grey).convert("RGB").save(folder / f"{i:03d}.png")
    return root


def run_cli(module: str, *flags, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", module, *map(str, flags)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}")
    return result


def read_log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def deepcluster_run(tiny_data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("deepcluster_run")
    run_cli("pydc.train", "--data", tiny_data, "--output", output, "--deterministic", "--checkpoint-steps", "1",
            *TINY_FLAGS)
    return output


def test_run_writes_log_assignments_plots_and_checkpoint(deepcluster_run, tiny_data):
    records = read_log(deepcluster_run)
    epochs = [record for record in records if "event" not in record]
    assert [record["epoch"] for record in epochs] == [0, 1]
    for record in epochs:
        for key in ("loss", "nmi_prev", "nmi_labels", "clusters", "images_per_s", "time_features", "time_pca",
                    "time_kmeans", "time_train"):
            assert key in record, key
        assert np.isfinite(record["loss"]) and record["images_per_s"] > 0
        assert record["clusters"]["max"] >= record["clusters"]["min"]
    assert epochs[0]["nmi_prev"] is None and 0.0 <= epochs[1]["nmi_prev"] <= 1.0
    final = records[-1]
    assert final["event"] == "final" and final["epoch"] == 2 and final["pydc_version"] == pydc.__version__
    for key in ("knn_accuracy", "linear_probe_accuracy", "nmi_kmeans"):
        assert 0.0 <= final[key] <= 1.0
    assert final["pca_dim"] == EVAL_PCA_DIM  # the evaluation's fixed whitening, not the run's --pca-dim 8
    for epoch in (0, 1):
        labels = np.load(deepcluster_run / "assignments" / f"epoch_{epoch:03d}.npy")
        assert labels.shape == (72,) and labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < 3
    np.testing.assert_array_equal(labels, load_checkpoint(deepcluster_run / "checkpoint.pt")["assignments"].numpy())
    for name in ("curves.png", "cluster_sizes.png", "exemplars.png"):
        assert (deepcluster_run / name).stat().st_size > 1000, name
    state = torch.load(deepcluster_run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 0 and state["args"]["algo"] == "deepcluster"
    assert {"model", "optimizer", "head_optimizer", "rng", "assignments", "global_step"} <= set(state)
    assert state["pydc_version"] == pydc.__version__  # which pydc wrote it (issue 17)
    assert not list(deepcluster_run.glob(".*.tmp")), "a temporary checkpoint file was left behind"


def test_eval_and_export_clis(deepcluster_run, tiny_data, tmp_path):
    result = run_cli("pydc.eval", "--checkpoint", deepcluster_run / "checkpoint.pt", "--data", tiny_data,
                     "--device", "cpu", "--knn-k", "5")
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["images"] == 72 and scores["classes"] == 3 and scores["feature_dim"] == 256
    for key in ("knn_accuracy", "linear_probe_accuracy", "nmi_kmeans"):
        assert 0.0 <= scores[key] <= 1.0
    assert scores["pca_dim"] == EVAL_PCA_DIM  # the trainer's final record's protocol, not the run's --pca-dim 8

    out = tmp_path / "backbone.pt"
    run_cli("pydc.export", "--checkpoint", deepcluster_run / "checkpoint.pt", "--out", out)
    weights = torch.load(out, weights_only=True)
    from pydc.models import build_model

    body = build_model("small", 16).body
    body.load_state_dict(weights)  # strict: the plain state_dict is exactly the body's
    saved = load_checkpoint(deepcluster_run / "checkpoint.pt")["model"]
    torch.testing.assert_close(weights["classifier.0.weight"], saved["backbone.body.classifier.0.weight"])


def test_odc_run_in_process(tiny_data, tmp_path):
    flags = [flag if flag != "2" else "3" for flag in TINY_FLAGS]  # three epochs
    code = pydc.train.main(["--algo", "odc", "--data", str(tiny_data), "--output", str(tmp_path), "--no-plots",
                            "--odc-min-cluster", "4", "--odc-centroid-interval", "2", *flags])
    assert code == 0
    records = read_log(tmp_path)
    epochs = [record for record in records if "event" not in record]
    assert [record["epoch"] for record in epochs] == [0, 1, 2]
    assert all(0.0 <= record["change_ratio"] <= 1.0 for record in epochs)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["algorithm"]["memory"] is not None
    np.testing.assert_array_equal(np.load(tmp_path / "assignments" / "epoch_002.npy"),
                                  state["algorithm"]["memory"]["label_bank"].numpy())
    assert records[-1]["event"] == "final" and 0.0 <= records[-1]["nmi_kmeans"] <= 1.0


@pytest.mark.parametrize("init", ["pca", "neck"])
def test_odc_memory_init_labels(tiny_data, tmp_path, monkeypatch, init):
    # The memory's initial labels are the k-means labels of the chosen features: the PCA-whitened backbone
    # features (DeepCluster's clustering) or the L2-normalised neck features; the memory stores the neck
    # features either way. The spy records what k-means was given and what init_memory received.
    from pydc.algorithms import odc

    seen = {}
    real_cluster, real_init = odc.cluster_features, odc.ODCMemory.init_memory

    def cluster_spy(features, pca, *rest, **kwargs):
        labels, timings = real_cluster(features, pca, *rest, **kwargs)
        seen.setdefault("clustered", (features.clone(), type(pca).__name__, labels.clone()))
        return labels, timings

    def init_spy(self, features, labels):
        seen.setdefault("memory", (features.clone(), labels.clone()))
        return real_init(self, features, labels)

    monkeypatch.setattr(odc, "cluster_features", cluster_spy)
    monkeypatch.setattr(odc.ODCMemory, "init_memory", init_spy)
    flags = [flag if flag != "2" else "1" for flag in TINY_FLAGS]
    assert pydc.train.main(["--algo", "odc", "--odc-init", init, "--data", str(tiny_data), "--output", str(tmp_path),
                            "--no-plots", "--no-eval", "--odc-min-cluster", "1", *flags]) == 0
    clustered, pca_type, labels = seen["clustered"]
    memory_features, memory_labels = seen["memory"]
    torch.testing.assert_close(memory_labels, labels.to(memory_labels.device))
    assert memory_features.shape[1] == 256  # the neck's width
    if init == "pca":
        assert pca_type == "PCAWhitening"
        assert not torch.allclose(clustered, memory_features)  # the backbone's features, not the neck's
    else:
        assert pca_type == "_Identity"
        torch.testing.assert_close(clustered, memory_features)
        torch.testing.assert_close(clustered.norm(dim=1), torch.ones(clustered.shape[0]), rtol=0, atol=1e-5)


def test_odc_option_defaults_and_errors(capsys):
    from pydc.utils.options import parse_args

    assert parse_args(["--algo", "odc"]).odc_dropout == 0.0  # small
    assert parse_args(["--algo", "odc", "--arch", "resnet50"]).odc_dropout == 0.5  # MMSelfSup's
    assert parse_args(["--algo", "odc", "--odc-dropout", "0.3"]).odc_dropout == 0.3
    assert parse_args([]).odc_init == "pca"
    assert parse_args([]).stem == "sobel" and parse_args(["--algo", "odc"]).stem == "sobel"
    assert parse_args(["--stem", "rgb"]).stem == "rgb"
    with pytest.raises(SystemExit):
        parse_args(["--odc-dropout", "1.0"])
    assert "--odc-dropout: expected a number in [0, 1), got 1.0" in capsys.readouterr().err


# -- bad input: one clear message, exit code 2, nothing already written lost -----------------------------------
def _fails(capsys, *flags) -> str:
    try:
        code = pydc.train.main([*TINY_FLAGS, "--no-plots", "--no-eval", *flags])
    except SystemExit as exit_info:  # refused while parsing the options
        code = exit_info.code
    assert code == 2
    return capsys.readouterr().err


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    message = _fails(capsys, "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "out"))
    assert "pydc.train: error:" in message and "empty" in message


def test_fewer_images_than_k(tiny_data, tmp_path, capsys):
    message = _fails(capsys, "--data", str(tiny_data), "--output", str(tmp_path), "--k", "500")
    assert "72 images, fewer than --k 500" in message


@pytest.mark.parametrize("content", [None, b"not a checkpoint", b"PK\x03\x04truncated"])
def test_missing_or_corrupt_checkpoint(tiny_data, tmp_path, capsys, content):
    checkpoint = tmp_path / "checkpoint.pt"
    if content is not None:
        checkpoint.write_bytes(content)
    message = _fails(capsys, "--data", str(tiny_data), "--output", str(tmp_path), "--resume", str(checkpoint))
    assert ("no such file" if content is None else "cannot be read") in message
    if content is not None:
        assert checkpoint.read_bytes() == content  # the user's file is left as it was


def test_unknown_arch(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pydc.train.main(["--arch", "resnet18"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'resnet18'" in capsys.readouterr().err


def test_unknown_arch_in_config(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("arch: lenet\nepochs: 1\n")
    with pytest.raises(SystemExit):
        pydc.train.main(["--config", str(config)])
    assert "--arch: expected one of small" in capsys.readouterr().err


def test_config_file_with_flags_overriding(tmp_path):
    from pydc.utils.options import parse_args

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"algo": "odc", "epochs": 7, "batch-size": 32, "lr": 0.1}))
    args = parse_args(["--config", str(config), "--epochs", "3"])
    assert (args.algo, args.epochs, args.batch_size, args.lr) == ("odc", 3, 32, 0.1)
    assert args.k is None and args.pca_dim == 64 and args.crop == 32  # k: from the data (train.py); the rest: the arch
    config.write_text(json.dumps({"epochz": 1}))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(config)])


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_data, tmp_path, capsys, monkeypatch):
    real_cross_entropy = torch.nn.functional.cross_entropy
    calls = {"count": 0}

    def diverging(logits, targets, **kwargs):
        calls["count"] += 1
        loss = real_cross_entropy(logits, targets, **kwargs)
        return loss * float("nan") if calls["count"] > 8 else loss  # epoch 0 has 6 steps of 12 images

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", diverging)
    message = _fails(capsys, "--data", str(tiny_data), "--output", str(tmp_path), "--checkpoint-steps", "0")
    assert "the loss became nan at epoch 1, step 2" in message
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1 and state["step"] == 0  # the end-of-epoch-0 checkpoint, untouched
    records = read_log(tmp_path)
    assert records[0]["epoch"] == 0 and records[-1]["event"] == "stopped"
    assert (tmp_path / "assignments" / "epoch_000.npy").exists()
