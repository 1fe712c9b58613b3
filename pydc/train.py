"""Train visual features without labels: `python -m pydc.train` (DeepCluster or ODC).

    python -m pydc.train                                  # DeepCluster, `small` net, bundled digits
    python -m pydc.train --algo odc
    torchrun --nproc_per_node=8 -m pydc.train --arch resnet50 --data /imagenet/train --k 10000 --pca-dim 256 \
        --batch-size 256 --output runs/in1k

Stages of `train(args)`: set-up (devices, seeds, output folder) -> data -> model and optimizers -> resume ->
epochs (DeepCluster: feature pass + PCA + k-means, then training on a uniform-over-clusters order; ODC:
training with the memory updated every step) -> final evaluation. Options: pydc/utils/options.py.

Outputs under --output: log.jsonl (one record per epoch, then a final one), checkpoint.pt (every epoch and
every --checkpoint-steps steps, atomic, enough to resume exactly), assignments/epoch_NNN.npy, and plots
(curves.png, cluster_sizes.png, exemplars.png).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from pydc.algorithms.deepcluster import DeepClusterModel, cluster_features, compute_features
from pydc.algorithms.odc_model import ODCModel
from pydc.models import build_model
from pydc.utils import dist as dist_utils
from pydc.utils.checkpoint import (CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state,
                                   save_checkpoint)
from pydc.utils.logging import JsonLinesLog
from pydc.utils.options import get_args_parser, parse_args  # noqa: F401  (get_args_parser: public entry point)
from pydc.utils.run_outputs import RunOutputs


class TrainingError(RuntimeError):
    """A problem the user can fix (bad data, bad options, diverged training): reported in one message."""


class NonFiniteLossError(TrainingError):
    pass


def _progress(total: int, description: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True,
                disable=not (sys.stderr.isatty() and dist_utils.is_main_process()))


def _epoch_seed(args, epoch: int) -> int:
    return args.seed * 1_000_003 + epoch


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: set-up
# ----------------------------------------------------------------------------------------------------------------
def set_up(args):
    rank, world_size, device = dist_utils.init_distributed(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {args.device} asks for a GPU but torch sees none; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed + rank)
    np.random.seed((args.seed + rank) % 2**32)
    random.seed(args.seed + rank)
    output = Path(args.output)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
    return rank, world_size, device, output


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: data
# ----------------------------------------------------------------------------------------------------------------
def build_data(args, rank: int, world_size: int, device: torch.device):
    from pydc.data import FeatureLoader, ImageFolderIndex, TrainLoader, digits_folder

    data_dir = Path(args.data) if args.data else Path(digits_folder())
    if not data_dir.is_dir():
        raise TrainingError(f"--data {data_dir}: no such folder; expected a folder of images (or of class "
                            f"sub-folders of images)")
    try:
        index = ImageFolderIndex(data_dir)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        raise TrainingError(f"--data {data_dir}: {error}") from None
    if len(index) == 0:
        raise TrainingError(f"--data {data_dir} holds no images; expected JPEG/PNG files (directly or in class "
                            f"sub-folders)")
    if len(index) < args.k:
        raise TrainingError(f"--data {data_dir} holds {len(index)} images, fewer than --k {args.k} clusters; "
                            f"lower --k or add images")
    feature_loader = FeatureLoader(index, args.crop, args.batch_size, device=str(device), backend=args.data_backend,
                                   num_threads=args.workers, rank=rank, world_size=world_size)
    train_loader = TrainLoader(index, args.crop, args.batch_size, device=str(device), backend=args.data_backend,
                               num_threads=args.workers, seed=args.seed + rank,
                               crop_scale=(args.crop_scale, 1.0))
    return index, feature_loader, train_loader


# ----------------------------------------------------------------------------------------------------------------
# Stage 3: model and optimizers
# ----------------------------------------------------------------------------------------------------------------
def build_training_model(args, device: torch.device):
    backbone = build_model(args.arch, args.crop)
    if args.algo == "deepcluster":
        model = DeepClusterModel(backbone, args.k)
        body_parameters, head_parameters = model.backbone.parameters(), model.top_layer.parameters()
    else:
        model = ODCModel(backbone, args.k, dropout=args.odc_dropout)
        body_parameters = list(model.backbone.parameters()) + list(model.neck.parameters())
        head_parameters = model.head.parameters()
    model = model.to(device)
    optimizer = torch.optim.SGD(body_parameters, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    # The top layer / head has its own SGD without momentum (DeepCluster re-creates it every epoch).
    head_optimizer = torch.optim.SGD(head_parameters, lr=args.lr, momentum=0.0, weight_decay=args.wd)
    return model, optimizer, head_optimizer


def _wrap(model, device):
    if not dist_utils.is_distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------------------------------
# One training epoch (both algorithms)
# ----------------------------------------------------------------------------------------------------------------
def train_one_epoch(args, model, loader, optimizer, head_optimizer, state, on_step, memory=None) -> dict:
    """Train on `loader` from `state["step"]` on; returns this call's stats (loss sum, images, seconds).

    A resumed epoch iterates past its first `state["step"]` batches without training on them: the loader's
    augmentation draws depend on the batch number, so this is what reproduces the uninterrupted epoch exactly
    (at the price of decoding those batches once more).

    DeepCluster's targets are `state["assignments"]`; ODC's are the memory's labels, and every step then
    updates the memory (features, labels), its centroids every --odc-centroid-interval steps and its small
    clusters. `on_step(step)` runs after every step (checkpoints).
    """
    model.train()
    stats = {"loss_sum": 0.0, "images": 0, "steps": 0, "change_ratio_sum": 0.0, "time_train": 0.0}
    start = time.perf_counter()
    progress = _progress(len(loader), f"epoch {state['epoch']} train")
    progress.update(state["step"])
    for batch_number, batch in enumerate(loader):
        if batch_number < state["step"]:
            continue
        images = batch.images
        indices = batch.indices.to(images.device)
        if memory is None:
            logits = model(images)
            loss = F.cross_entropy(logits, state["assignments"].to(images.device)[indices])
        else:
            features, logits = model(images)
            targets = memory.label_bank[indices.to(memory.label_bank.device)].to(images.device)
            loss = F.cross_entropy(logits, targets, weight=memory.loss_weights().to(logits.device))
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(f"the loss became {loss_value} at epoch {state['epoch']}, step {state['step']}; "
                                     f"training stopped and the last checkpoint was kept. Lower --lr, or resume "
                                     f"from that checkpoint")
        optimizer.zero_grad(set_to_none=True)
        head_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        head_optimizer.step()
        if memory is not None:
            stats["change_ratio_sum"] += float(memory.update_samples(indices, features.detach()))
            if (state["global_step"] + 1) % args.odc_centroid_interval == 0:
                memory.update_centroids()
            memory.deal_with_small_clusters()
        stats["loss_sum"] += loss_value * images.shape[0]
        stats["images"] += images.shape[0]
        stats["steps"] += 1
        state["step"] += 1
        state["global_step"] += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.3f}")
        on_step(stats, start)
    progress.close()
    stats["time_train"] = time.perf_counter() - start
    return stats


def _merge(total: dict, part: dict) -> dict:
    return {key: total.get(key, 0) + value for key, value in part.items()}


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def train(args) -> dict:
    # -- stage 1: set-up ---------------------------------------------------------------------------------------
    rank, world_size, device, output = set_up(args)
    log = JsonLinesLog(output / "log.jsonl")
    outputs = RunOutputs(output, enabled=rank == 0, plots=not args.no_plots, tensorboard=args.tensorboard)

    # -- stage 2: data ------------------------------------------------------------------------------------------
    index, feature_loader, train_loader = build_data(args, rank, world_size, device)
    num_images = len(index)
    true_labels = None if index.labels is None else torch.as_tensor(np.asarray(index.labels), dtype=torch.int64)

    # -- stage 3: model and optimizers ---------------------------------------------------------------------------
    model, optimizer, head_optimizer = build_training_model(args, device)
    memory = None
    if args.algo == "odc":
        from pydc.algorithms.odc import ODCMemory

        memory = ODCMemory(num_images, model.feature_dim, args.k, momentum=args.odc_momentum,
                           min_cluster=args.odc_min_cluster, device=device)

    # -- stage 4: resume ------------------------------------------------------------------------------------------
    state = {"epoch": 0, "step": 0, "global_step": 0, "assignments": None, "previous_assignments": None,
             "partial": {}, "cluster_record": {}}
    checkpoint_path = output / "checkpoint.pt"
    resume = args.resume
    if resume == "auto":
        resume = str(checkpoint_path) if checkpoint_path.exists() else None
    if resume:
        saved = load_checkpoint(resume, map_location="cpu")
        _check_compatible(saved["args"], args, resume)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        head_optimizer.load_state_dict(saved["head_optimizer"])
        if memory is not None and saved.get("memory") is not None:
            memory.load_state_dict({key: value.to(device) if torch.is_tensor(value) else value
                                    for key, value in saved["memory"].items()})
        for key in ("epoch", "step", "global_step", "assignments", "previous_assignments", "partial",
                    "cluster_record"):
            state[key] = saved[key]
        restore_rng_state(saved["rng"])
        if rank == 0:
            log.truncate_after_epoch(state["epoch"])
            outputs.note(f"resumed from {resume} at epoch {state['epoch']}, step {state['step']}")
    training_model = _wrap(model, device)

    def save(tag: str) -> None:
        if rank != 0:
            return
        save_checkpoint({
            "args": {key: value for key, value in vars(args).items()},
            "epoch": state["epoch"], "step": state["step"], "global_step": state["global_step"],
            "world_size": world_size, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "head_optimizer": head_optimizer.state_dict(), "rng": capture_rng_state(),
            "assignments": state["assignments"], "previous_assignments": state["previous_assignments"],
            "memory": memory.state_dict() if memory is not None else None,
            "partial": state["partial"], "cluster_record": state["cluster_record"], "tag": tag,
            # The sampler's order is a function of (seed, epoch, assignments); its position is what this rank
            # has consumed of it (a resume skips exactly that many batches).
            "sampler": {"seed": args.seed, "epoch": state["epoch"], "position": state["step"] * args.batch_size},
        }, checkpoint_path)

    # -- stage 5: epochs ------------------------------------------------------------------------------------------
    try:
        while state["epoch"] < args.epochs:
            epoch = state["epoch"]
            epoch_start = time.perf_counter()
            if state["step"] == 0:
                state["partial"] = {}
                state["cluster_record"] = _cluster_stage(args, model, memory, feature_loader, num_images, device,
                                                         state)
            order = _training_order(args, state, memory, num_images, rank, world_size)
            train_loader.set_epoch(epoch)
            train_loader.set_order(order)
            if args.algo == "deepcluster" and state["step"] == 0:
                # A fresh top layer (reset in _cluster_stage) gets a fresh optimizer; a resumed epoch keeps the
                # loaded one.
                head_optimizer = torch.optim.SGD(model.top_layer.parameters(), lr=args.lr, momentum=0.0,
                                                 weight_decay=args.wd)

            partial_before = dict(state["partial"])

            def on_step(stats, start, partial_before=partial_before):
                state["partial"] = _merge(partial_before, {**stats, "time_train": time.perf_counter() - start})
                if args.checkpoint_steps and state["global_step"] % args.checkpoint_steps == 0:
                    save("step")

            stats = train_one_epoch(args, training_model, train_loader, optimizer, head_optimizer, state, on_step,
                                    memory)
            totals = _merge(partial_before, stats)
            record = _epoch_record(args, state, memory, totals, true_labels, time.perf_counter() - epoch_start)
            if rank == 0:
                log.write(record)
                outputs.epoch_end(record, state["assignments"], args.k, log.read())
            state["previous_assignments"] = state["assignments"]
            state["epoch"] += 1
            state["step"] = 0
            state["partial"] = {}
            save("epoch")
    except NonFiniteLossError as error:
        if rank == 0:
            log.write({"epoch": state["epoch"], "event": "stopped", "reason": str(error)})
        raise

    # -- stage 6: final evaluation -------------------------------------------------------------------------------
    final = {"event": "final", "epoch": state["epoch"], "images": num_images, "world_size": world_size}
    if world_size > 1 and state["assignments"] is not None:
        final["ranks_agree"] = _ranks_agree(state["assignments"].to(device))
        (output / "assignments").mkdir(parents=True, exist_ok=True)
        np.save(output / "assignments" / f"final.rank{rank}.npy", state["assignments"].cpu().numpy())
    if not args.no_eval and true_labels is not None:
        model.eval()
        features = compute_features(model.backbone.features, feature_loader, num_images, device)
        if rank == 0:
            from pydc.eval import evaluate_features

            final.update(evaluate_features(features, true_labels, seed=args.seed, pca_dim=args.pca_dim))
    if rank == 0:
        log.write(final)
        outputs.final(index, state["assignments"], args.k)
    dist_utils.barrier()
    return final


def _cluster_stage(args, model, memory, feature_loader, num_images, device, state) -> dict:
    """DeepCluster: features -> PCA -> k-means -> new assignments and a fresh top layer. ODC: the first epoch
    initialises the memory with the L2-normalised neck features and the labels of one k-means (over the
    PCA-whitened backbone features with --odc-init pca, DeepCluster's clustering; over the neck features
    themselves with --odc-init neck, MMSelfSup's); later epochs keep the memory."""
    from pydc.cluster import PCAWhitening

    epoch = state["epoch"]
    if memory is not None and epoch > 0:
        state["assignments"] = memory.label_bank.detach().clone().cpu()
        return {}
    model.eval()
    start = time.perf_counter()  # time_features includes ODC's BN calibration pass
    if memory is not None:
        _calibrate_batch_norm(model, feature_loader, device)
    progress = _progress(len(feature_loader), f"epoch {epoch} features")
    backbone = model.backbone
    neck_features = None
    if memory is None or args.odc_init == "pca":
        # ODC's pca init takes the neck features from the same pass, behind the backbone's.
        width = backbone.feature_dim
        feature_fn = backbone.features if memory is None else _BackboneAndNeck(model)
        pca = PCAWhitening(n_components=min(args.pca_dim, width, num_images))
        streaming = not dist_utils.is_distributed()
        try:
            features = compute_features(feature_fn, feature_loader, num_images, device,
                                        on_batch=(lambda batch: pca.partial_fit(batch[:, :width])) if streaming
                                        else None, progress=progress)
            if memory is not None:
                features, neck_features = features[:, :width], features[:, width:]
            if not streaming and dist_utils.is_main_process():
                pca.fit(features)
        except ValueError as error:  # PCA refuses NaN/Inf features: the network has diverged
            raise TrainingError(f"epoch {epoch}: the features are not finite ({error}); training has diverged. "
                                f"Lower --lr and resume from an earlier checkpoint") from None
    else:
        pca = _Identity()
        features = neck_features = F.normalize(compute_features(model.embed, feature_loader, num_images, device,
                                                                progress=progress), dim=1)
    progress.close()
    record = {"time_features": time.perf_counter() - start}
    try:
        labels, timings = cluster_features(features, pca, args.k, _epoch_seed(args, epoch), args.kmeans_backend,
                                           args.kmeans_iters)
    except ValueError as error:
        raise TrainingError(f"epoch {epoch}: clustering failed: {error}") from None
    if memory is None:
        model.reset_top_layer(args.seed, epoch)
    else:
        memory.init_memory(neck_features, labels.to(device))
        labels = memory.label_bank.detach().clone()
    record.update(timings)
    state["assignments"] = labels.cpu()
    return record


class _BackboneAndNeck:
    """ODC's init pass: the backbone's clustering features and the neck's, side by side in one (B, D + 256) row."""

    def __init__(self, model):
        self.model = model

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        backbone = self.model.backbone
        features = backbone.features(images)  # backbone(images) is train_activation(features(images))
        return torch.cat([features, self.model.neck(backbone.train_activation(features))], dim=1)


@torch.no_grad()
def _calibrate_batch_norm(model, loader, device) -> None:
    """One train-mode pass (no gradients) so that BN's running statistics describe the data before the ODC
    memory is initialised from eval-mode features. An untrained net's running statistics (mean 0, variance 1)
    leave its eval-mode features nearly parallel (mean cosine 0.999 on the digits) and the initial k-means
    close to chance (NMI 0.2 vs 0.4 after this pass); DeepCluster's PCA-whitening does not need it."""
    model.train()
    for batch in loader:
        model.embed(batch.images.to(device))
    model.eval()


class _Identity:
    """Stands in for PCA where ODC clusters the L2-normalised features as they are."""

    def transform(self, features):
        return features


def _training_order(args, state, memory, num_images, rank, world_size) -> list[int]:
    """This rank's image order for the epoch: uniform over clusters (DeepCluster) or a shuffle (ODC)."""
    epoch = state["epoch"]
    if memory is None:
        from pydc.cluster import UniformLabelSampler

        sampler = UniformLabelSampler(state["assignments"], num_images, seed=args.seed, epoch=epoch, rank=rank,
                                      world_size=world_size)
        return [int(i) for i in sampler]
    generator = torch.Generator().manual_seed(_epoch_seed(args, epoch))
    permutation = torch.randperm(num_images, generator=generator)
    per_rank = math.ceil(num_images / world_size)
    permutation = torch.cat([permutation, permutation[: per_rank * world_size - num_images]])
    return permutation[rank * per_rank:(rank + 1) * per_rank].tolist()


def _epoch_record(args, state, memory, totals, true_labels, seconds) -> dict:
    from pydc.cluster import cluster_size_stats, nmi

    assignments = state["assignments"] if memory is None else memory.label_bank.detach().cpu()
    if memory is not None:
        state["assignments"] = assignments.clone()
    images = max(1, totals.get("images", 0))
    record = {"epoch": state["epoch"], "algo": args.algo, "loss": totals.get("loss_sum", 0.0) / images,
              "nmi_prev": None if state["previous_assignments"] is None
              else nmi(state["previous_assignments"], assignments)}
    if true_labels is not None:
        record["nmi_labels"] = nmi(true_labels, assignments)
    record["clusters"] = cluster_size_stats(assignments, args.k)
    world_size = dist_utils.world_size()
    record["images_per_s"] = totals.get("images", 0) * world_size / max(totals.get("time_train", 0.0), 1e-9)
    record.update(state["cluster_record"])
    record["time_train"] = totals.get("time_train", 0.0)
    record["time_epoch"] = seconds
    if memory is not None:
        record["change_ratio"] = totals.get("change_ratio_sum", 0.0) / max(1, totals.get("steps", 0))
    record["lr"] = args.lr
    return record


def _ranks_agree(assignments: torch.Tensor) -> bool:
    reference = assignments.clone()
    dist_utils.broadcast_tensor(reference, 0)
    agree = torch.tensor([int(torch.equal(reference, assignments))], device=assignments.device)
    torch.distributed.all_reduce(agree, op=torch.distributed.ReduceOp.MIN)
    return bool(agree.item())


def _check_compatible(saved_args: dict, args, path) -> None:
    for key in ("algo", "arch", "k", "crop"):
        if saved_args.get(key) != getattr(args, key):
            raise CheckpointError(f"checkpoint {path} was written with --{key} {saved_args.get(key)}, but this run "
                                  f"has --{key} {getattr(args, key)}; pass the same options to resume")


def main(argv=None) -> int:
    args = parse_args(argv)
    final = None
    try:
        final = train(args)
        is_main = dist_utils.is_main_process()
    except (TrainingError, CheckpointError, FloatingPointError) as error:
        print(f"pydc.train: error: {error}", file=sys.stderr)
        return 2
    finally:
        dist_utils.cleanup()
    if final and is_main:
        import json

        print(json.dumps({key: value for key, value in final.items() if not isinstance(value, dict)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
