"""The suite's outputs: results.json (everything), results.md (tables and the issue's targets), results.png.

Targets (issue 14), checked per dataset with the same defaults everywhere:
- DeepCluster's NMI >= raw-pixel k-means + 0.10 and its linear probe >= raw pixels' + 0.05;
- ODC's NMI within 0.03 of DeepCluster's (when ODC ran);
- digits only: DeepCluster NMI >= 0.92, linear probe >= 0.99, and NMI above UMAP + k-means (when UMAP ran).
"""

from __future__ import annotations

import json
from pathlib import Path

NMI_MARGIN, LINEAR_MARGIN, ODC_GAP = 0.10, 0.05, 0.03
DIGITS_NMI, DIGITS_LINEAR = 0.92, 0.99


def _by_method(rows: list[dict], dataset: str) -> dict[str, dict]:
    return {row["method"]: row for row in rows if row["dataset"] == dataset}


def check_targets(document: dict) -> list[dict]:
    """One {dataset, target, value, goal, met} per applicable target."""
    checks = []
    for dataset in document["datasets"]:
        methods = _by_method(document["rows"], dataset)
        deepcluster, raw = methods.get("deepcluster"), methods.get("raw-pixels")
        if deepcluster is None or raw is None:
            continue

        def check(target, value, goal, note=None):
            checks.append({"dataset": dataset, "target": target, "value": value, "goal": goal, "met": value >= goal,
                           **({"note": note} if note else {})})

        check("deepcluster NMI - raw k-means NMI", deepcluster["nmi"] - raw["nmi"], NMI_MARGIN)
        # Reported as missed, not waived: the lead decides how the target reads where it cannot be met.
        unreachable = raw["linear"] + LINEAR_MARGIN > 1.0
        check("deepcluster linear - raw linear", deepcluster["linear"] - raw["linear"], LINEAR_MARGIN,
              f"unreachable: raw pixels already score {raw['linear']:.3f}" if unreachable else None)
        if "odc" in methods:
            check("odc NMI - deepcluster NMI", methods["odc"]["nmi"] - deepcluster["nmi"], -ODC_GAP)
        if dataset == "digits":
            check("deepcluster NMI", deepcluster["nmi"], DIGITS_NMI)
            check("deepcluster linear", deepcluster["linear"], DIGITS_LINEAR)
            if "umap+kmeans" in methods:
                check("deepcluster NMI - umap+kmeans NMI", deepcluster["nmi"] - methods["umap+kmeans"]["nmi"], 0.0)
    return checks


def _cpu(machine: dict) -> str:
    """'AMD EPYC (family 25 model 17, AVX-512), 2 CPUs, load average 8.3 at start' (parts only when known)."""
    details = [f"family {machine['cpu_family']} model {machine['cpu_model']}"] if machine.get("cpu_family") else []
    details += ["AVX-512"] if machine.get("avx512") else []
    text = machine["cpu"] + (f" ({', '.join(details)})" if details else "") + f", {machine['cpu_count']} CPUs"
    if machine.get("load_average_at_start") is not None:
        text += f", load average {machine['load_average_at_start']:.1f} at start"
    return text


def markdown(document: dict) -> str:
    machine, config = document["machine"], document["config"]
    lines = [
        "# pydc quality suite",
        "",
        f"Machine: {_cpu(machine)}, {machine['threads']} torch thread(s), torch {machine['torch']}. "
        f"Seed {config['seed']}; trainer flags: "
        f"`{' '.join(config['train_args']) or '(defaults)'}`.",
        "",
        "NMI: k-means with k = number of classes on the features, PCA-whitened to "
        f"{config['baseline_pca_dim']} (every row, whatever the run's --pca-dim) and L2-normalised, best of 5 by "
        "objective; raw "
        "pixels: k-means on the L2-normalised pixels; UMAP: k-means on the 10-d embedding. NMI-L2: k-means on the "
        "L2-normalised features. Linear probe and k-NN "
        "(k = 20, cosine): 70/30 stratified split. Seconds: wall time (training rows: the whole `pydc.train` "
        "subprocess).",
        "",
        "| dataset | images | classes | method | NMI | NMI-L2 | linear probe | k-NN | seconds |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in document["rows"]:
        info = document["datasets"][row["dataset"]]
        lines.append(f"| {row['dataset']} | {info['images']} | {info['classes']} | {row['method']} | "
                     f"{row['nmi']:.3f} | {row['nmi_l2']:.3f} | {row['linear']:.3f} | {row['knn']:.3f} | "
                     f"{row['seconds']:.0f} |")
    checks = document.get("targets") or []
    if checks:
        lines += ["", "## Targets (issue 14)", "", "| dataset | target | value | goal | met |", "|---|---|---:|---:|---|"]
        lines += [f"| {c['dataset']} | {c['target']} | {c['value']:+.3f} | {c['goal']:+.2f} | "
                  f"{'yes' if c['met'] else 'NO'}{' (' + c['note'] + ')' if c.get('note') else ''} |" for c in checks]
    return "\n".join(lines) + "\n"


def bar_chart(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    datasets = list(document["datasets"])
    methods = list(dict.fromkeys(row["method"] for row in document["rows"]))
    figure, axes = plt.subplots(3, 1, figsize=(3 + 2.0 * len(datasets), 10), sharex=True)
    width = 0.8 / len(methods)
    for axis, (metric, title) in zip(axes, (("nmi", "NMI (k = classes)"), ("linear", "linear probe"),
                                           ("knn", "k-NN"))):
        for position, method in enumerate(methods):
            values = [_by_method(document["rows"], dataset).get(method, {}).get(metric, np.nan) for dataset in datasets]
            axis.bar(np.arange(len(datasets)) + (position - (len(methods) - 1) / 2) * width, values, width,
                     label=method)
        axis.set_xticks(np.arange(len(datasets)), datasets)
        axis.set_title(title)
        axis.set_ylim(0, 1)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small", loc="lower left", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(document: dict, output: Path) -> dict[str, Path]:
    """results.json, results.md and results.png under `output`; returns their paths."""
    output.mkdir(parents=True, exist_ok=True)
    document = {**document, "targets": check_targets(document)}
    paths = {"json": output / "results.json", "markdown": output / "results.md", "chart": output / "results.png"}
    paths["json"].write_text(json.dumps(document, indent=1))
    paths["markdown"].write_text(markdown(document))
    bar_chart(document, paths["chart"])
    return paths
