"""The quality suite (pydc.quality): its datasets, its target checks, and its plumbing end to end on tiny data.

The end-to-end test runs `python -m pydc.quality` on tiny versions of every dataset (48 images, one epoch), so
that the suite cannot rot; the numbers it produces on such data mean nothing and are only range-checked.
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

from pydc.eval import main as evaluate_checkpoint
from pydc.quality.datasets import DATASETS, IMAGE_SIZE, build_dataset, class_counts
from pydc.quality.report import check_targets, markdown
from pydc.quality.runner import EVAL_PCA_DIM, trainer_algorithms

REPO = Path(__file__).resolve().parents[1]


def _folder_contents(folder: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(d.glob("*.png")) for d in sorted(folder.iterdir()) if d.is_dir()}


@pytest.mark.parametrize("name", list(DATASETS))
def test_dataset_has_the_promised_classes_counts_and_sizes(name, tmp_path):
    dataset = DATASETS[name]
    images = 3 * len(dataset.classes) + 1  # not a multiple of the class count: the spread is uneven
    contents = _folder_contents(build_dataset(name, images=images, seed=3, root=tmp_path))
    assert sorted(contents) == sorted(dataset.classes)
    counts = [len(contents[class_name]) for class_name in dataset.classes]
    assert counts == class_counts(images, len(dataset.classes))
    assert sum(counts) == images
    for files in contents.values():
        for path in files:
            with Image.open(path) as image:
                assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"


@pytest.mark.parametrize("name", [name for name in DATASETS if name != "digits"])
def test_generated_dataset_is_a_function_of_its_seed(name, tmp_path):
    def pixels(root, seed):
        folder = build_dataset(name, images=2 * len(DATASETS[name].classes), seed=seed, root=root)
        return [np.asarray(Image.open(path)) for files in _folder_contents(folder).values() for path in files]

    first, again, other = pixels(tmp_path / "a", 5), pixels(tmp_path / "b", 5), pixels(tmp_path / "c", 6)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))
    # The images of a class differ from each other (random placement, scale, colours), not one picture copied.
    assert not np.array_equal(first[0], first[1])


def test_a_rendered_dataset_is_reused(tmp_path):
    folder = build_dataset("shapes", images=20, seed=0, root=tmp_path)
    marker = folder / "circle" / "00000.png"
    stamp = marker.stat().st_mtime_ns
    assert build_dataset("shapes", images=20, seed=0, root=tmp_path) == folder
    assert marker.stat().st_mtime_ns == stamp


def test_bad_dataset_requests_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown quality dataset 'nope'"):
        build_dataset("nope", root=tmp_path)
    with pytest.raises(ValueError, match="at least 2 images per class"):
        build_dataset("shapes", images=15, root=tmp_path)
    with pytest.raises(ValueError, match="at most 1797"):
        build_dataset("digits", images=1900, root=tmp_path)


def _document(deepcluster_nmi: float, raw_nmi: float, odc_nmi: float, deepcluster_linear: float = 0.99,
              raw_linear: float = 0.90) -> dict:
    def row(method, nmi, linear):
        return {"dataset": "digits", "method": method, "nmi": nmi, "nmi_l2": nmi, "linear": linear, "knn": 0.5,
                "seconds": 1.0}

    rows = [row("raw-pixels", raw_nmi, raw_linear), row("deepcluster", deepcluster_nmi, deepcluster_linear),
            row("odc", odc_nmi, 0.9), row("umap+kmeans", 0.90, 0.9)]
    return {"datasets": {"digits": {"images": 1797, "classes": 10}}, "rows": rows}


def test_targets_compare_against_the_baselines():
    met = {c["target"]: c["met"] for c in check_targets(_document(0.93, 0.80, 0.91))}
    assert met == {"deepcluster NMI - raw k-means NMI": True, "deepcluster linear - raw linear": True,
                   "odc NMI - deepcluster NMI": True, "deepcluster NMI": True, "deepcluster linear": True,
                   "deepcluster NMI - umap+kmeans NMI": True}
    missed = {c["target"]: c["met"] for c in check_targets(_document(0.88, 0.80, 0.84, deepcluster_linear=0.93))}
    assert missed == {"deepcluster NMI - raw k-means NMI": False, "deepcluster linear - raw linear": False,
                      "odc NMI - deepcluster NMI": False, "deepcluster NMI": False, "deepcluster linear": False,
                      "deepcluster NMI - umap+kmeans NMI": False}


def test_a_probe_margin_beyond_accuracy_one_is_reported_missed_and_marked_unreachable():
    reachable = {c["target"]: c for c in check_targets(_document(0.93, 0.80, 0.91))}
    assert "note" not in reachable["deepcluster linear - raw linear"]
    checks = {c["target"]: c for c in check_targets(_document(0.93, 0.80, 0.91, deepcluster_linear=0.995,
                                                              raw_linear=0.959))}
    margin = checks["deepcluster linear - raw linear"]
    assert not margin["met"] and "unreachable" in margin["note"] and "0.959" in margin["note"]
    assert "unreachable: raw pixels already score 0.959" in markdown({"machine": _MACHINE, "config": _CONFIG,
                                                                      **_document(0.93, 0.8, 0.91, 0.995, 0.959),
                                                                      "targets": list(checks.values())})


_MACHINE = {"cpu": "test cpu", "cpu_count": 2, "threads": 1, "torch": "x"}
_CONFIG = {"seed": 0, "train_args": [], "baseline_pca_dim": 32}


def test_the_report_names_the_machine_and_its_load():
    machine = {**_MACHINE, "cpu_family": "25", "cpu_model": "17", "avx512": True, "load_average_at_start": 8.64}
    table = markdown({"machine": machine, "config": _CONFIG, **_document(0.93, 0.8, 0.91)})
    assert "Machine: test cpu (family 25 model 17, AVX-512), 2 CPUs, load average 8.6 at start, 1 torch thread" in table


@pytest.mark.slow
def test_suite_end_to_end_on_tiny_datasets(tmp_path, capsys, request):
    output = tmp_path / "report"
    command = [sys.executable, "-m", "pydc.quality", "--images", "48", "--output", str(output), "--no-umap",
               "--dataset-root", str(tmp_path / "datasets"), "--threads", "1",
               "--train-args", "--epochs 1 --k 4 --pca-dim 8 --batch-size 16 --workers 1 --device cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]

    document = json.loads((output / "results.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the suite's process (--threads 1), so that the k-means below repeats exactly
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    algorithms = trainer_algorithms()
    expected = {(dataset, method) for dataset in DATASETS for method in ["raw-pixels", "random-net", *algorithms]}
    assert {(row["dataset"], row["method"]) for row in document["rows"]} == expected
    for row in document["rows"]:
        for metric in ("nmi", "nmi_l2", "linear", "knn"):
            assert 0.0 <= row[metric] <= 1.0, row
        assert row["seconds"] > 0
        if row["kind"] == "trained":
            assert row["epochs"] == 1 and "--epochs" in row["command"]
            run = output / "runs" / row["dataset"] / row["method"]
            assert (run / "log.jsonl").is_file()
            # The table's NMI and the trainer's final record whiten to the fixed EVAL_PCA_DIM, not the run's
            # --pca-dim 8: it must equal what pydc.eval computes from the run's checkpoint at that dimension.
            assert (row["pca_dim"], row["run_pca_dim"]) == (EVAL_PCA_DIM, EVAL_PCA_DIM)
            assert 0 <= row["nmi_run_pca"] <= 1
            capsys.readouterr()
            assert evaluate_checkpoint(["--checkpoint", str(run / "checkpoint.pt"), "--data",
                                        document["datasets"][row["dataset"]]["folder"], "--pca-dim",
                                        str(EVAL_PCA_DIM), "--device", "cpu", "--workers", "1"]) == 0
            assert row["nmi"] == pytest.approx(json.loads(capsys.readouterr().out)["nmi_kmeans"], abs=1e-9)
    for name, info in document["datasets"].items():
        assert info["images"] == 48 and info["classes"] == len(DATASETS[name].classes)
    assert {check["dataset"] for check in document["targets"]} == set(DATASETS)

    table = (output / "results.md").read_text()
    for dataset, method in expected:
        assert f"| {dataset} | 48 | {len(DATASETS[dataset].classes)} | {method} |" in table
    assert (output / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suite_refuses_unknown_algorithms_and_datasets(tmp_path):
    for flag, value, message in (("--algos", "nope", "unknown algorithm"), ("--datasets", "nope", "unknown dataset")):
        result = subprocess.run([sys.executable, "-m", "pydc.quality", flag, value, "--output", str(tmp_path)],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and message in result.stderr, result.stderr
