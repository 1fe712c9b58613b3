"""What a run leaves under --output besides the log and checkpoint: assignments, plots, TensorBoard scalars.

Only rank 0 writes (`enabled`). Files are replaced atomically, so a run killed at any moment leaves complete
files behind; a plotting failure is reported and skipped rather than stopping the training.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def save_array(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(handle, "wb") as stream:
        np.save(stream, array)
    os.replace(temporary, path)
    return path


class RunOutputs:
    def __init__(self, folder: Path, enabled: bool, plots: bool = True, tensorboard: bool = False):
        self.folder = Path(folder)
        self.enabled = enabled
        self.plots = plots
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.folder / "tb"))
            except ImportError:
                self.note("--tensorboard: the tensorboard package is not installed; skipping TensorBoard output")

    def note(self, message: str) -> None:
        if self.enabled:
            print(f"pydc.train: {message}", file=sys.stderr)

    def epoch_end(self, record: dict, assignments: torch.Tensor, num_clusters: int, records: list[dict]) -> None:
        if not self.enabled:
            return
        labels = assignments.cpu().numpy().astype(np.int64)
        save_array(labels, self.folder / "assignments" / f"epoch_{record['epoch']:03d}.npy")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()
        if self.plots:
            self._plot(lambda: self._curves_and_sizes(records, labels, num_clusters))

    def final(self, index, assignments, num_clusters: int) -> None:
        if not self.enabled or assignments is None:
            return
        if self.plots:
            self._plot(lambda: self._exemplars(index, assignments.cpu().numpy(), num_clusters))
        if self.writer is not None:
            self.writer.close()

    def _plot(self, draw) -> None:
        try:
            draw()
        except Exception as error:  # a broken plot must not cost a training run
            self.note(f"plotting failed ({type(error).__name__}: {error}); continuing")

    def _curves_and_sizes(self, records, labels, num_clusters) -> None:
        from pydc.utils.plots import plot_cluster_sizes, plot_curves

        epoch_records = [record for record in records if "loss" in record and "event" not in record]
        plot_curves(epoch_records, self.folder / "curves.png")
        plot_cluster_sizes(labels, num_clusters, self.folder / "cluster_sizes.png")

    def _exemplars(self, index, labels, num_clusters, clusters: int = 8, per_cluster: int = 8) -> None:
        from PIL import Image

        from pydc.utils.plots import plot_exemplars

        sizes = np.bincount(labels, minlength=num_clusters)
        largest = [int(c) for c in np.argsort(-sizes, kind="stable")[:clusters] if sizes[c] > 0]
        rows = []
        generator = np.random.default_rng(0)
        for cluster in largest:
            members = np.flatnonzero(labels == cluster)
            members = np.sort(generator.choice(members, min(per_cluster, len(members)), replace=False))
            images = [torch.from_numpy(np.array(Image.open(index.paths[i]).convert("RGB").resize((64, 64))))
                      .permute(2, 0, 1) for i in members]
            rows.append(torch.stack(images))
        plot_exemplars(rows, largest, [int(sizes[c]) for c in largest], self.folder / "exemplars.png")
