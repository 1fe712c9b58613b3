"""Command-line options of `python -m pydc.train`, grouped and explained, with --config files underneath flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pydc.algorithms import ALGORITHMS
from pydc.algorithms.deepcluster import HEAD_INIT as DC_HEAD_INIT, HEAD_K as DC_HEAD_K
from pydc.cluster.kmeans import BACKENDS as KMEANS_BACKENDS
from pydc.data.loaders import BACKENDS as DATA_BACKENDS
from pydc.models import ARCHITECTURES
from pydc.utils.schedule import SCHEDULES
from pydc.utils.validate import OptionError, check_types, check_values

# --k and --pca-dim when not given: functions of the data, never of its (unknown) number of classes. k is
# resolved once the data folder is indexed (train.py), the PCA dimension from the backbone's feature width.
# Rules and the quality-suite evidence behind them: README ("Defaults").
def default_k(num_images: int) -> int:
    """Over-cluster as DeepCluster does (k = 10000 for ImageNet's 1.28M images): one cluster per ~32 images,
    at least 10 and at most 10000, never more than the images."""
    return max(1, min(num_images, 10_000, max(10, round(num_images / 32))))


def default_pca_dim(feature_dim: int) -> int:
    """A quarter of the feature width, clipped to [32, 256] (256 is DeepCluster's ImageNet value for 4096-d fc7)."""
    return min(256, max(32, feature_dim // 4))


# MMSelfSup's ODC dissolves clusters under 20 members with k = 10000 on ImageNet's 1.28M images, i.e. under
# ~16% of the mean cluster size (128). A fixed 20 is wrong at other N / k: at the default k (~32 images per
# cluster) most clusters would be under 20 and be dissolved and refilled every step.
ODC_MIN_CLUSTER_FRACTION = 20 / (1_281_167 / 10_000)


def default_odc_min_cluster(num_images: int, k: int) -> int:
    """ODC's smallest kept cluster: the same fraction of the mean cluster size N / k as MMSelfSup's 20 on
    ImageNet (20 there, 5 at ~32 images per cluster), at least 1 (only empty clusters are refilled)."""
    return max(1, round(ODC_MIN_CLUSTER_FRACTION * num_images / k))


# Smallest RandomResizedCrop area. DeepCluster: 0.3, not torchvision's 0.08 (an 8% crop of a 32x32 image is 9x9
# pixels, a stroke or a patch of texture); with the cosine schedule it raised the quality suite's probe on
# shapes 0.669 -> 0.722 (README "Defaults"). ODC labels every sample from its training crop (DeepCluster from the
# centre view): 0.5 keeps those online labels steady; 0.3 was a wash on the suite (NMI -0.04..+0.03 by dataset).
DEFAULT_CROP_SCALE = {"deepcluster": 0.3, "odc": 0.5, "dcv2": 0.14}
# The fixed first layer: DeepCluster and ODC are defined on Sobel-filtered grey images, DeepCluster-v2 on RGB
# with colour augmentation.
DEFAULT_STEM = {"deepcluster": "sobel", "odc": "sobel", "dcv2": "rgb"}
# DeepCluster-v2's multi-crop, SwAV's for 224-pixel crops (2 x 224 at area [0.14, 1] + 6 x 96 at [0.05, 0.14]);
# for the 32x32 digits: 16-pixel small crops (half the large crop; 96/224 of 32 would be 14), 4 of them to keep
# a step near 3 large-crop equivalents on a CPU, and larger areas, since a 5% window of a 32x32 digit holds a
# stroke or two. The large crops start at half the image, as ODC's crops (DEFAULT_CROP_SCALE): the memory's
# clusters come from training crops, and smaller ones agree less across two crops of an image (README).
DEFAULT_DCV2_SMALL_CROPS = {"small": 4}
DEFAULT_DCV2_LARGE_SCALE = {"small": 0.5}
DEFAULT_DCV2_SMALL_SCALE = {"small": 0.1}
# SwAV's colour distortion strength s (jitter factors in [1 - 0.8 s, 1 + 0.8 s]). On grey images hue,
# saturation and grayscale do nothing and brightness / contrast down to 0.2 x erase the digits; the random
# network's clusters then follow each crop's brightness, which the next crop redraws, and the embeddings
# collapse in the first steps (memory_cosine 0.36 -> 0.85 in epoch 0, at any --lr; README). None for `small`.
DEFAULT_DCV2_COLOR_STRENGTH = {"small": 0.0}
# ODC neck dropout by arch (MMSelfSup's 0.5 otherwise). The memory is updated with the features of the training
# forward pass, dropout included; on the digits, with 0.5, those features and so the online labels are noisy.
DEFAULT_ODC_DROPOUT = {"small": 0.0}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pydc.train",
        description="Train visual features without labels by DeepCluster, ODC or DeepCluster-v2. With no flags: "
                    "DeepCluster with the `small` net on the bundled digits, on whatever device is there (a few "
                    "minutes on a CPU).",
        epilog="Exit status: 0 done; 2 bad options, data or checkpoint (one line on stderr); 143 (SIGTERM) or "
               "138 (SIGUSR1): preempted, the run finished its step and wrote OUTPUT/checkpoint.pt: continue "
               "it with --resume auto.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="YAML or JSON file of options (keys as the long flags, - or _); flags override it")

    algorithm = parser.add_argument_group("algorithm")
    algorithm.add_argument("--algo", choices=list(ALGORITHMS), default="deepcluster",
                           help="deepcluster: k-means over all features every epoch; odc: an online memory bank; "
                                "dcv2: DeepCluster-v2, multi-crop with prototypes from k-means of an embedding "
                                "memory (pydc/algorithms/: one module per algorithm)")
    algorithm.add_argument("--arch", choices=list(ARCHITECTURES), default="small",
                           help="backbone behind the stem; small is sized for 32x32 digits on a CPU")
    algorithm.add_argument("--stem", choices=["sobel", "rgb"], default=None,
                           help="fixed first layer: sobel = grey + Sobel filters (DeepCluster, ODC), rgb = "
                                "Normalize only (default: sobel for deepcluster/odc, rgb for dcv2)")
    algorithm.add_argument("--k", type=int, default=None,
                           help="number of clusters (default: from the number of images N: "
                                "clip(round(N / 32), 10, 10000); 10000 is the ImageNet value)")
    algorithm.add_argument("--pca-dim", type=int, default=None,
                           help="PCA-whitening dimension before k-means (default: a quarter of the backbone's "
                                "feature width, clipped to [32, 256]: 64 for small, 256 for alexnet/vgg16/resnet50)")
    algorithm.add_argument("--kmeans-iters", type=int, default=20, help="k-means iterations per clustering")
    algorithm.add_argument("--kmeans-backend", choices=KMEANS_BACKENDS, default="auto",
                           help="pydc.cluster.kmeans backend (auto: faiss on the CPU when installed, else pydc's)")
    algorithm.add_argument("--cluster-on", choices=["gather", "shard", "auto"], default="auto",
                           help="where the clustering's features live under torchrun. gather: every rank's features "
                                "on every rank, rank 0 fits PCA and runs k-means (--kmeans-backend), labels "
                                "broadcast. shard: each rank keeps its own shard; sharded PCA and pydc's k-means, "
                                "only statistics and the int32 labels cross the network (faiss cannot shard). "
                                "auto (default): shard when distributed and the gathered features would exceed "
                                "1/4 of a device's memory (GPU, or host memory / local ranks on the CPU), else "
                                "gather. DeepCluster's feature pass, ODC's memory initialisation, DCv2's memory "
                                "k-means")
    algorithm.add_argument("--dc-heads", type=int, default=1,
                           help="DeepCluster: clusterings per epoch (k-means of the same features from "
                                "different seeds), each with its own top layer; the loss is their mean "
                                "cross-entropy, the sampler uniform over the first one's clusters "
                                "(1: the original)")
    algorithm.add_argument("--dc-head-k", choices=list(DC_HEAD_K), default="same",
                           help="DeepCluster with --dc-heads > 1: same = --k clusters for every head; "
                                "spread = k, k/2, 2k, k/4, 4k, ... for heads 0, 1, 2, 3, 4, ...")
    algorithm.add_argument("--dc-head-init", choices=list(DC_HEAD_INIT), default="random",
                           help="DeepCluster: the top layer at each epoch start: random = weights "
                                "N(0, 0.01), bias 0 (the original); centroids = from epoch 1 on, each head "
                                "the nearest-centroid classifier of its new clusters, scaled to the least "
                                "cross-entropy on the feature pass")
    algorithm.add_argument("--odc-momentum", type=float, default=0.2,
                           help="ODC: weight of the new feature in a memory row's update (MMSelfSup uses 0.5 on "
                                "ImageNet; 0.2 keeps the digits memory steadier)")
    algorithm.add_argument("--odc-min-cluster", type=int, default=None,
                           help="ODC: clusters smaller than this are dissolved every step (default: 16%% of the "
                                "mean cluster size N / k, at least 1: MMSelfSup's 20 for k = 10000 on ImageNet, 5 "
                                "at the default k)")
    algorithm.add_argument("--odc-init", choices=["pca", "neck"], default="pca",
                           help="ODC: where the memory's initial labels come from: pca = DeepCluster's first "
                                "clustering (k-means on the PCA-whitened backbone features), neck = k-means on the "
                                "L2-normalised neck features (MMSelfSup); the memory stores the neck features either way")
    algorithm.add_argument("--odc-dropout", type=float, default=None,
                           help="ODC: dropout in the neck (default: 0.5 as MMSelfSup, 0 for `small`: the memory takes "
                                "its features in train mode, and on the digits dropped units make its labels churn)")
    algorithm.add_argument("--odc-linear-init", choices=["mmselfsup", "torch"], default="mmselfsup",
                           help="ODC: initialisation of the neck's and head's linear layers: mmselfsup = weights "
                                "N(0, 0.01), biases 0; torch = PyTorch's Linear default (Kaiming-uniform)")
    algorithm.add_argument("--odc-centroid-interval", type=int, default=10,
                           help="ODC: recompute the centroids every this many steps")
    algorithm.add_argument("--dcv2-prototypes", type=int, default=3,
                           help="DeepCluster-v2: prototype sets (k-means runs per epoch, --k clusters each); set j "
                                "clusters the memory of large crop j mod 2")
    algorithm.add_argument("--dcv2-temperature", type=float, default=0.1,
                           help="DeepCluster-v2: softmax temperature of the cosine scores against the prototypes")
    algorithm.add_argument("--dcv2-kmeans-iters", type=int, default=10,
                           help="DeepCluster-v2: spherical k-means iterations per prototype set and epoch")
    algorithm.add_argument("--dcv2-small-crops", type=int, default=None,
                           help="DeepCluster-v2: small crops per image beside the 2 large ones (default: 6 as "
                                "SwAV, 4 for `small`)")
    algorithm.add_argument("--dcv2-small-size", type=int, default=None,
                           help="DeepCluster-v2: small crop size (default: 96 for 224-pixel crops, else --crop // 2)")
    algorithm.add_argument("--dcv2-large-scale", type=float, default=None,
                           help="DeepCluster-v2: smallest area fraction of a large crop, which is also the largest "
                                "of a small crop (default: SwAV's 0.14, 0.5 for `small`)")
    algorithm.add_argument("--dcv2-small-scale", type=float, default=None,
                           help="DeepCluster-v2: smallest area fraction of a small crop (default: SwAV's 0.05, "
                                "0.1 for `small`)")
    algorithm.add_argument("--dcv2-color-strength", type=float, default=None,
                           help="DeepCluster-v2: strength s of SwAV's colour distortion of every crop (jitter by "
                                "[1 - 0.8 s, 1 + 0.8 s], random grayscale); 0: none (default: SwAV's 1, 0 for "
                                "`small`: the digits are grey)")

    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None, help="image folder (default: the bundled digits); class sub-folders, "
                                                   "when present, are used only to report NMI against labels")
    data.add_argument("--crop", type=int, default=None, help="training crop size (default: 32 for small, else 224)")
    data.add_argument("--crop-scale", type=float, default=None,
                      help="smallest area fraction of a RandomResizedCrop (default: 0.3 for deepcluster, 0.5 for "
                           "odc, whose online labels come from the training crops; torchvision's is 0.08)")
    data.add_argument("--batch-size", type=int, default=32, help="images per step and per process (256 on ImageNet)")
    data.add_argument("--workers", type=int, default=2, help="decoding threads per process")
    data.add_argument("--data-backend", choices=DATA_BACKENDS, default="auto", help="pydc.data loader backend")

    optimization = parser.add_argument_group("optimization")
    optimization.add_argument("--epochs", type=int, default=30)
    optimization.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (backbone and top layer)")
    optimization.add_argument("--lr-schedule", choices=SCHEDULES, default="cosine",
                              help="learning rate over the run: constant (DeepCluster's and ODC's papers), or "
                                   "cosine decay to 0 at the last epoch (after the warm-up); cosine by default: at a "
                                   "constant rate DeepCluster's clusters still swing by 0.07-0.13 NMI at the end")
    optimization.add_argument("--warmup-epochs", type=float, default=0.0,
                              help="linear warm-up of the learning rate from 0 over this many epochs")
    optimization.add_argument("--wd", type=float, default=1e-5, help="weight decay")
    optimization.add_argument("--momentum", type=float, default=0.9, help="backbone SGD momentum (the top layer "
                                                                         "has none)")

    run = parser.add_argument_group("run")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="cpu or cuda; under torchrun each process uses the GPU of its LOCAL_RANK")
    run.add_argument("--output", default="runs/digits", help="folder for the log, checkpoints, assignments, plots")
    run.add_argument("--resume", default=None,
                     help="checkpoint to resume from exactly; 'auto' = OUTPUT/checkpoint.pt if it exists")
    run.add_argument("--checkpoint-steps", type=int, default=200,
                     help="also checkpoint every this many steps inside an epoch (0: only at epoch ends)")
    run.add_argument("--keep-checkpoints", type=int, default=0,
                     help="also keep the last this many epochs' checkpoints as OUTPUT/checkpoints/epoch_NNNN.pt "
                          "(0: only the latest, OUTPUT/checkpoint.pt)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic kernels: a resumed run ends bit-identical to an uninterrupted one")
    run.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    run.add_argument("--no-eval", action="store_true", help="skip the final k-NN / probe / NMI evaluation")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    run.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to OUTPUT/tb")
    return parser


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        text = file.read_text()
        if file.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"--config {path}: cannot be read as {'JSON' if file.suffix.lower() == '.json' else 'YAML'}"
                         f" ({error})") from None
    except Exception as error:  # yaml.YAMLError, without importing yaml for JSON configs
        raise ValueError(f"--config {path}: cannot be read as YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values, got {type(values).__name__}")
    known = {action.dest for action in parser._actions}
    defaults = {}
    for key, value in values.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in known or dest in ("help", "config"):
            raise ValueError(f"--config {path}: unknown option {key!r}; valid keys are the long flags of "
                             f"`python -m pydc.train --help`")
        defaults[dest] = value
    return defaults


def _fill_defaults(args: argparse.Namespace) -> None:
    """Options whose defaults depend on the algorithm or the architecture."""
    if args.pca_dim is None:
        from pydc.models import FEATURE_DIM

        args.pca_dim = default_pca_dim(FEATURE_DIM[args.arch])
    if args.crop is None:
        from pydc.models import DEFAULT_INPUT_SIZE

        args.crop = DEFAULT_INPUT_SIZE[args.arch]
    if args.stem is None:
        args.stem = DEFAULT_STEM[args.algo]
    if args.dcv2_small_crops is None:
        args.dcv2_small_crops = DEFAULT_DCV2_SMALL_CROPS.get(args.arch, 6)
    if args.dcv2_small_size is None:
        args.dcv2_small_size = 96 if args.crop == 224 else max(1, args.crop // 2)
    if args.dcv2_large_scale is None:
        args.dcv2_large_scale = DEFAULT_DCV2_LARGE_SCALE.get(args.arch, 0.14)
    if args.dcv2_small_scale is None:
        args.dcv2_small_scale = DEFAULT_DCV2_SMALL_SCALE.get(args.arch, 0.05)
    if args.dcv2_color_strength is None:
        args.dcv2_color_strength = DEFAULT_DCV2_COLOR_STRENGTH.get(args.arch, 1.0)
    if args.crop_scale is None:
        args.crop_scale = DEFAULT_CROP_SCALE[args.algo]
    if args.odc_dropout is None:
        args.odc_dropout = DEFAULT_ODC_DROPOUT.get(args.arch, 0.5)


def resolve_data_defaults(args: argparse.Namespace, num_images: int) -> None:
    """Defaults that depend on the data: --k from the number of images, then --odc-min-cluster from N / k (each
    left as given when set)."""
    if args.k is None:
        args.k = default_k(num_images)
    if args.odc_min_cluster is None:
        args.odc_min_cluster = default_odc_min_cluster(num_images, args.k)


def parse_args(argv=None) -> argparse.Namespace:
    """Flags over --config over built-in defaults, every value checked (pydc.utils.validate) before anything
    is read or written; a bad one exits with status 2 and one message. Fills --k, --crop and the other
    algorithm- and arch-dependent defaults."""
    parser = get_args_parser()
    preliminary, _ = parser.parse_known_args(argv)
    config = {}
    if preliminary.config:
        try:
            config = _config_defaults(parser, preliminary.config)
        except ValueError as error:
            parser.error(str(error))
        parser.set_defaults(**config)
    args = parser.parse_args(argv)
    try:
        check_types(parser, args, config, preliminary.config)
        _fill_defaults(args)
        check_values(args, config, preliminary.config)
    except OptionError as error:
        parser.error(str(error))
    return args
