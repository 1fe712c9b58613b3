"""The quality suite: `python -m pydc.quality` trains every algorithm with its defaults on several small
labelled datasets of different kinds, beside baselines, and writes a Markdown table, JSON and a bar chart.

- datasets: the datasets, rendered locally from a seed (nothing is downloaded);
- baselines: raw pixels, a random network, UMAP + k-means (when umap-learn is installed);
- runner: the baselines in-process, the trainer through its CLI, one run at a time;
- report: results.json, results.md (with the issue's targets), results.png.
"""

from pydc.quality.datasets import DATASETS, build_dataset

__all__ = ["DATASETS", "build_dataset"]
