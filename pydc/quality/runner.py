"""Runs the suite: for each dataset, the baselines in-process, then every algorithm through the real CLI.

Each training run is `python -m pydc.train --algo A --data DIR --output OUT --no-plots --threads N --seed S
[extra flags]` in a subprocess, one at a time; its scores are those of the trainer's final record in
OUT/log.jsonl (pydc.eval's protocol on the final features), its wall time that of the whole subprocess
(start-up, data, training, evaluation).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pydc.eval import EVAL_PCA_DIM
from pydc.info import cpu_identity
from pydc.quality import baselines
from pydc.quality.datasets import DATASETS, build_dataset

# Every NMI in the suite's table (random network and trained rows; raw pixels are clustered L2-normalised only,
# see baselines.raw_pixels) whitens to pydc.eval.EVAL_PCA_DIM, not the run's --pca-dim, which is itself a
# default under test: whitening more directions of the same features moved the NMI by up to 0.07
# (photo-regions, PCA 64 vs L2-only). The trainer's final record now uses EVAL_PCA_DIM too (it used --pca-dim
# before); the suite still re-scores every run from its checkpoint and keeps the run's figure as nmi_run_pca.


class QualityRunError(RuntimeError):
    """A training run of the suite failed; the message carries the tail of its output."""


@dataclass
class SuiteConfig:
    datasets: list[str]
    algorithms: list[str]
    output: Path
    images: int | None = None  # None: each dataset's own size
    seed: int = 0
    threads: int = 1
    train_args: list[str] = field(default_factory=list)
    umap: bool = True
    dataset_root: Path | None = None  # None: <cache>/quality


def trainer_algorithms() -> list[str]:
    """The trainer's --algo choices, read from its parser at run time (new algorithms join automatically)."""
    from pydc.utils.options import get_args_parser

    for action in get_args_parser()._actions:
        if action.dest == "algo" and action.choices:
            return list(action.choices)
    raise RuntimeError("pydc.train's parser has no --algo choices")


def trainer_defaults(extra_args: list[str]) -> dict:
    """The options a training run with `extra_args` resolves to (arch, crop, ...), without running it."""
    from pydc.utils.options import parse_args

    return vars(parse_args(list(extra_args)))


def read_final_record(log_path: Path) -> dict:
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    finals = [record for record in records if record.get("event") == "final"]
    if not finals:
        raise QualityRunError(f"{log_path} holds no final record")
    return finals[-1]


def run_training(algorithm: str, data_dir: Path, output: Path, config: SuiteConfig) -> dict:
    """One `python -m pydc.train` run; returns its final record with the wall time of the subprocess."""
    if output.exists():
        shutil.rmtree(output)  # a stale log.jsonl would be appended to
    command = [sys.executable, "-m", "pydc.train", "--algo", algorithm, "--data", str(data_dir), "--output",
               str(output), "--no-plots", "--threads", str(config.threads), "--seed", str(config.seed),
               "--checkpoint-steps", "0", *config.train_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads)}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if output.is_dir():
        (output / "stdout.txt").write_text(result.stdout)
    if result.returncode != 0:
        raise QualityRunError(f"{' '.join(command)} failed with exit status {result.returncode}:\n"
                              f"{result.stderr[-3000:]}")
    final = read_final_record(output / "log.jsonl")
    epochs = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()
              if line.strip() and "loss" in json.loads(line)]
    return {**final, "nmi_run_pca": final.get("nmi_kmeans"), "run_pca_dim": final.get("pca_dim"),
            **fixed_protocol_nmi(output / "checkpoint.pt", data_dir, config.seed), "seconds": seconds, "command": command[1:],
            "nmi_labels_last_epoch": epochs[-1].get("nmi_labels") if epochs else None}


def fixed_protocol_nmi(checkpoint: Path, data_dir: Path, seed: int) -> dict:
    """{nmi_kmeans, pca_dim}: k-means NMI (pydc.eval's protocol) of the checkpoint's features, whitened to
    EVAL_PCA_DIM whatever the run's --pca-dim."""
    from pydc.eval import backbone_from_checkpoint, extract_features, kmeans_nmi
    from pydc.utils.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    features, labels = extract_features(backbone_from_checkpoint(state, torch.device("cpu")), str(data_dir),
                                        batch_size=256, device=torch.device("cpu"), workers=1)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return {"nmi_kmeans": kmeans_nmi(features, labels, int(labels.unique().numel()), seed, EVAL_PCA_DIM),
            "pca_dim": EVAL_PCA_DIM}


def _row(dataset: str, method: str, kind: str, scores: dict, **extra) -> dict:
    return {"dataset": dataset, "method": method, "kind": kind,
            "nmi": scores["nmi_kmeans"], "nmi_l2": scores["nmi_kmeans_l2"],
            "linear": scores["linear_probe_accuracy"], "knn": scores["knn_accuracy"],
            "seconds": scores["seconds"], "pca_dim": scores.get("pca_dim"), **extra}


def run_suite(config: SuiteConfig, log=print, on_dataset_done=None) -> dict:
    """Every dataset x (baselines + algorithms); returns the result document that pydc.quality.report writes.
    `on_dataset_done(document so far)` runs after each dataset (the CLI rewrites the report: a long run that is
    stopped still leaves the finished datasets' table)."""
    unknown = [name for name in config.datasets if name not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; expected some of {', '.join(DATASETS)}")
    choices = trainer_algorithms()
    unknown = [name for name in config.algorithms if name not in choices]
    if unknown:
        raise ValueError(f"unknown algorithm(s) {unknown}; pydc.train offers {', '.join(choices)}")
    torch.set_num_threads(config.threads)
    defaults = trainer_defaults(config.train_args)
    use_umap = config.umap and baselines.umap_available()
    rows, datasets = [], {}
    document = {"rows": rows, "datasets": datasets, "machine": machine_description(config.threads),
                "config": {"datasets": config.datasets, "algorithms": config.algorithms, "images": config.images,
                           "seed": config.seed, "threads": config.threads, "train_args": config.train_args,
                           "umap": use_umap, "baseline_pca_dim": EVAL_PCA_DIM}}
    for name in config.datasets:
        folder = build_dataset(name, config.images, config.seed, config.dataset_root)
        pixels, labels = baselines.load_pixels(folder)
        datasets[name] = {"folder": str(folder), "images": int(len(labels)), "classes": int(labels.max()) + 1,
                          "description": DATASETS[name].description}
        log(f"[{name}] {len(labels)} images, {labels.max() + 1} classes: baselines")
        rows.append(_row(name, "raw-pixels", "baseline", baselines.raw_pixels(pixels, labels, config.seed)))
        rows.append(_row(name, "random-net", "baseline",
                         baselines.random_network(folder, defaults["arch"], defaults["crop"], labels, config.seed,
                                                  EVAL_PCA_DIM)))
        if use_umap:
            scores = baselines.umap_kmeans(pixels, labels, config.seed)
            rows.append(_row(name, "umap+kmeans", "baseline", {**scores, "nmi_kmeans": scores["nmi_kmeans_plain"]}))
        for algorithm in config.algorithms:
            log(f"[{name}] training {algorithm}")
            final = run_training(algorithm, folder, config.output / "runs" / name / algorithm, config)
            rows.append(_row(name, algorithm, "trained", final,
                             epochs=final.get("epoch"), command=final["command"], nmi_run_pca=final["nmi_run_pca"],
                             run_pca_dim=final["run_pca_dim"],
                             nmi_labels_last_epoch=final["nmi_labels_last_epoch"]))
            log(f"[{name}] {algorithm}: NMI {final['nmi_kmeans']:.3f}, linear {final['linear_probe_accuracy']:.3f}, "
                f"{final['seconds']:.0f} s")
        if on_dataset_done is not None:
            on_dataset_done(document)
    return document


def machine_description(threads: int) -> dict:
    """CPU (name, x86 family/model, AVX-512), threads, versions and the load average when the suite started:
    wall times on a shared machine are only comparable at a similar load."""
    identity = cpu_identity()
    cpu = identity["model_name"] or platform.processor() or platform.machine()
    family, model, avx512 = identity["family"], identity["model"], "avx512f" in identity["flags"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cpu_family": family, "cpu_model": model, "avx512": avx512, "cpu_count": os.cpu_count(),
            "threads": threads, "load_average_at_start": load, "torch": torch.__version__,
            "python": platform.python_version()}
