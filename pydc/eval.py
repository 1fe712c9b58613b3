"""Evaluate a checkpoint's frozen features: k-NN accuracy, linear-probe accuracy, NMI of k-means vs labels.

    python -m pydc.eval --checkpoint runs/digits/checkpoint.pt --data DIR

prints one JSON object. The data folder must have one sub-folder per class (the labels). Features are the
backbone's clustering features (the same as training clusters) on centre crops, in eval mode. Both
classifiers train on a stratified 70% split and are scored on the other 30% (fixed by --seed):
- k-NN: cosine similarity on L2-normalised features, majority vote of the --knn-k nearest training images;
- linear probe: scikit-learn LogisticRegression on standardised features;
- NMI: k-means with k = number of classes (best of 5 initialisations by objective) on the features of
  every image, PCA-whitened to --pca-dim and L2-normalised as DeepCluster clusters them (`nmi_kmeans`;
  default: EVAL_PCA_DIM = 32 for every run, whatever --pca-dim it trained with), and on the L2-normalised
  features alone (`nmi_kmeans_l2`), vs the labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from pydc.utils.checkpoint import CheckpointError, load_checkpoint

KMEANS_RESTARTS = 5


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int) -> float:
    similarity = F.normalize(test_features, dim=1) @ F.normalize(train_features, dim=1).T
    neighbours = similarity.topk(min(k, train_features.shape[0]), dim=1).indices
    votes = F.one_hot(train_labels[neighbours], int(train_labels.max()) + 1).sum(dim=1)
    return float((votes.argmax(dim=1) == test_labels).float().mean())


def linear_probe_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                          test_labels: np.ndarray, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(train_features, train_labels)
    return float(probe.score(test_features, test_labels))


def kmeans_nmi(features: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int, pca_dim: int | None) -> float:
    """NMI against the labels of k-means (k = classes) on the features prepared as DeepCluster clusters them:
    PCA-whitened to `pca_dim` and L2-normalised (or only L2-normalised when pca_dim is None)."""
    from pydc.cluster import PCAWhitening, kmeans, nmi

    features = features.float()
    if pca_dim:
        prepared = PCAWhitening(n_components=min(pca_dim, features.shape[1], features.shape[0] - 1)).fit_transform(
            features)
    else:
        prepared = F.normalize(features, dim=1)
    # Best of KMEANS_RESTARTS initialisations by the k-means objective (never by NMI): one run's NMI swings by
    # several points with its seed on features this size, which would make the score a draw.
    runs = [kmeans(prepared, num_classes, niter=50, seed=seed * KMEANS_RESTARTS + restart)
            for restart in range(KMEANS_RESTARTS)]
    best = min(runs, key=lambda run: run.objective[-1] if run.objective else float("inf"))
    return float(nmi(best.labels.cpu(), labels.cpu()))


# The evaluation's PCA-whitening width for the k-means NMI: fixed, so that runs trained with different --pca-dim
# (a training option, whose default follows the feature width) are scored alike.
EVAL_PCA_DIM = 32


def evaluate_features(features: torch.Tensor, labels, seed: int = 0, knn_k: int = 20,
                      test_fraction: float = 0.3, pca_dim: int = EVAL_PCA_DIM) -> dict:
    """The three scores for (N, D) features and N integer labels (tensor or array)."""
    from sklearn.model_selection import train_test_split

    features = features.detach().float().cpu()
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    num_classes = int(labels.unique().numel())
    if num_classes < 2:
        raise ValueError(f"evaluation needs at least 2 classes (one sub-folder per class), got {num_classes}")
    train_index, test_index = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed,
                                               stratify=labels.numpy())
    train_index, test_index = torch.from_numpy(train_index), torch.from_numpy(test_index)
    return {
        "images": int(len(labels)),
        "classes": num_classes,
        "feature_dim": int(features.shape[1]),
        "knn_k": knn_k,
        "knn_accuracy": knn_accuracy(features[train_index], labels[train_index], features[test_index],
                                     labels[test_index], knn_k),
        "linear_probe_accuracy": linear_probe_accuracy(features[train_index].numpy(), labels[train_index].numpy(),
                                                       features[test_index].numpy(), labels[test_index].numpy(),
                                                       seed),
        "pca_dim": pca_dim,
        "nmi_kmeans": kmeans_nmi(features, labels, num_classes, seed, pca_dim),
        "nmi_kmeans_l2": kmeans_nmi(features, labels, num_classes, seed, None),
    }


def backbone_from_checkpoint(state: dict, device: torch.device):
    """Rebuild the checkpoint's backbone (arch and crop from its stored args) with its trained weights."""
    from pydc.models import build_model

    args = state["args"]
    backbone = build_model(args["arch"], args.get("crop"), stem=args.get("stem", "sobel"))
    prefix = "backbone."
    weights = {key[len(prefix):]: value for key, value in state["model"].items() if key.startswith(prefix)}
    backbone.load_state_dict(weights)
    return backbone.to(device).eval()


@torch.no_grad()
def extract_features(backbone, data_dir: str, batch_size: int, device: torch.device, workers: int = 2,
                     backend: str = "auto"):
    """(features (N, D) on the CPU, labels or None) for every image of `data_dir`, in index order."""
    from pydc.data import FeatureLoader, ImageFolderIndex

    index = ImageFolderIndex(data_dir)
    loader = FeatureLoader(index, backbone.input_size, batch_size, device=str(device), backend=backend,
                           num_threads=workers)
    features = torch.cat([backbone.features(batch.images.to(device)).float().cpu() for batch in loader])
    return features, index.labels


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pydc.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by pydc.train")
    parser.add_argument("--data", default=None, help="labelled image folder (default: the bundled digits)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--knn-k", type=int, default=20, help="neighbours that vote in the k-NN classifier")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split and of k-means")
    parser.add_argument("--pca-dim", type=int, default=None,
                        help=f"PCA-whitening dimension before k-means (default: {EVAL_PCA_DIM} for every checkpoint, "
                             f"whatever its --pca-dim)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        from pydc.data import digits_folder

        data_dir = args.data or str(digits_folder())
        device = torch.device(args.device)
        state = load_checkpoint(args.checkpoint)
        backbone = backbone_from_checkpoint(state, device)
        start = time.perf_counter()
        features, labels = extract_features(backbone, data_dir, args.batch_size, device, args.workers)
        if labels is None:
            raise ValueError(f"{data_dir} has no class sub-folders, so there are no labels to evaluate against; "
                             f"point --data at a folder with one sub-folder per class")
        pca_dim = args.pca_dim or EVAL_PCA_DIM
        scores = evaluate_features(features, labels, seed=args.seed, knn_k=args.knn_k, pca_dim=pca_dim)
    except (CheckpointError, ValueError, FileNotFoundError) as error:
        print(f"pydc.eval: error: {error}", file=sys.stderr)
        return 2
    result = {"checkpoint": str(args.checkpoint), "data": data_dir, "arch": state["args"]["arch"],
              "algo": state["args"].get("algo"), "epoch": state.get("epoch"), **scores,
              "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
