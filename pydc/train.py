"""Train visual features without labels: `python -m pydc.train --algo NAME` (names: pydc.algorithms.ALGORITHMS).

    python -m pydc.train                                  # the default algorithm, `small` net, bundled digits
    python -m pydc.train --algo NAME
    torchrun --nproc_per_node=8 -m pydc.train --arch resnet50 --data /imagenet/train --k 10000 --pca-dim 256 \
        --batch-size 256 --output runs/in1k

This file is the generic trainer; it names no algorithm. Each algorithm is a class in pydc/algorithms/ with the
interface of pydc/algorithms/base.py (model, epoch start, sample order, loss, after-step work, state).
Stages of `train(args)`: set-up (devices, seeds, output folder) -> data -> model and optimizers -> resume ->
epochs (the algorithm's epoch start, then the step loop on its order) -> final evaluation. Options:
pydc/utils/options.py.

Outputs under --output: log.jsonl (one record per epoch, then a final one), checkpoint.pt (every epoch and
every --checkpoint-steps steps, atomic, enough to resume exactly), checkpoints/epoch_NNNN.pt (the last
--keep-checkpoints), assignments/epoch_NNN.npy, and plots (curves.png, cluster_sizes.png, exemplars.png).
On SIGTERM/SIGUSR1 (preemption, pydc/utils/preemption.py) the run finishes its step, checkpoints, logs a
`preempted` record and exits with 128 + the signal number; `--resume auto` continues it.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from pydc._version import __version__
from pydc.algorithms import ALGORITHMS, Loaders, TrainingError
from pydc.algorithms.features import compute_features, progress_bar
from pydc.data.screen import NoUsableImages, require_enough_images
from pydc.models import build_model
from pydc.utils import dist as dist_utils
from pydc.utils.checkpoint import (FORMAT_VERSION, CheckpointError, capture_rng_state, check_compatible,
                                   keep_epoch_checkpoint, load_checkpoint, remove_stale_temporaries,
                                   save_checkpoint)
from pydc.utils.logging import JsonLinesLog
from pydc.utils.options import (get_args_parser, parse_args,  # noqa: F401  (get_args_parser: public entry point)
                                resolve_data_defaults)
from pydc.utils.preemption import Preempted, PreemptionGuard
from pydc.utils.resume import algorithm_state as algorithm_state_of, restore_rank_rng
from pydc.utils.run_outputs import RunOutputs
from pydc.utils.schedule import learning_rate, set_learning_rate


class NonFiniteLossError(TrainingError):
    pass


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: set-up
# ----------------------------------------------------------------------------------------------------------------
def set_up(args):
    """Devices, threads, determinism and seeds; the output folder is made later, once the data is usable."""
    rank, world_size, device = dist_utils.init_distributed(args.device)  # --device was checked by validate.py
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
    return rank, world_size, device


def make_output(args, rank: int) -> Path:
    """The output folder (rank 0 makes it), without the temporary files of a checkpoint write that was killed."""
    output = Path(args.output)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(output / "checkpoint.pt")
    dist_utils.barrier()
    return output


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: data
# ----------------------------------------------------------------------------------------------------------------
def build_index(args):
    """The image index of --data (default: the bundled digits; validate.py checked that the folder exists),
    checked to be usable with --k."""
    from pydc.data import ImageFolderIndex, digits_folder

    data_dir = Path(args.data) if args.data else Path(digits_folder())
    try:
        index = ImageFolderIndex(data_dir)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        raise TrainingError(f"--data {data_dir}: {error}") from None
    if len(index) == 0:
        raise TrainingError(f"--data {data_dir} holds no images; expected JPEG/PNG files (directly or in class "
                            f"sub-folders)")
    resolve_data_defaults(args, len(index))
    if len(index) < args.k:
        raise TrainingError(f"--data {data_dir} holds {len(index)} images, fewer than --k {args.k} clusters; "
                            f"lower --k or add images")
    return index


def build_loaders(args, index, algorithm, rank: int, world_size: int, device: torch.device):
    """The feature loader (centre crops, this rank's shard) and the training loader (crops the algorithm asks for)."""
    from pydc.data import FeatureLoader, TrainLoader

    feature_loader = FeatureLoader(index, args.crop, args.batch_size, device=str(device), backend=args.data_backend,
                                   num_threads=args.workers, rank=rank, world_size=world_size)
    train_options = {}
    if algorithm.train_views() is not None:
        train_options["views"] = algorithm.train_views()
    color_strength = float(algorithm.color_distortion())
    if color_strength:
        train_options["color_distortion"] = color_strength
    try:
        train_loader = TrainLoader(index, args.crop, args.batch_size, device=str(device), backend=args.data_backend,
                                   num_threads=args.workers, seed=args.seed + rank,
                                   crop_scale=(args.crop_scale, 1.0), **train_options)
    except (ValueError, ImportError) as error:
        raise TrainingError(f"training loader: {error}") from None
    return feature_loader, train_loader


# ----------------------------------------------------------------------------------------------------------------
# Stage 3: model and optimizers
# ----------------------------------------------------------------------------------------------------------------
def build_training_model(args, algorithm):
    """The algorithm's model around the backbone, SGD with momentum for its body, SGD without for its head."""
    backbone = build_model(args.arch, args.crop, stem=args.stem)
    model, body_parameters, head_parameters = algorithm.build(backbone)
    optimizer = torch.optim.SGD(body_parameters, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    return model, optimizer, _head_optimizer(args, head_parameters)


def _head_optimizer(args, head_parameters):
    """The head's own SGD without momentum (re-created every epoch where the algorithm asks); None if no head."""
    head_parameters = list(head_parameters)
    if not head_parameters:
        return None
    return torch.optim.SGD(head_parameters, lr=args.lr, momentum=0.0, weight_decay=args.wd)


def _wrap(model, device):
    if not dist_utils.is_distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------------------------------
# One training epoch
# ----------------------------------------------------------------------------------------------------------------
def train_one_epoch(algorithm, model, loader, optimizers, state, on_step, totals: dict | None = None,
                    rate_at=None) -> dict:
    """Train on `loader` from `state["step"]` on; returns the epoch's stats (loss sum, images, steps, seconds,
    and what the algorithm's `after_step` adds), summed on from `totals` (a resumed epoch's sums so far, so that
    its sums are added in the same order as an uninterrupted epoch's: bit-identical logs).

    A resumed epoch starts the loader at batch `state["batch"]` (loader.start_at): the batches before it are not
    read again, and since a batch's augmentation draws depend only on (seed, epoch, batch number) the epoch goes
    on exactly as it would have. `state["batch"]` is the position after the last trained batch in the epoch's
    batches (it exceeds `state["step"]` where a batch whose files all failed was left out). `on_step(stats)` runs
    after every step (checkpoints). `rate_at(progress)` gives the learning rate at `progress` epochs into the run
    (pydc.utils.schedule), set on every optimizer before each step.
    """
    model.train()
    stats = {"loss_sum": 0.0, "images": 0, "steps": 0, "time_train": 0.0, **(totals or {})}
    time_before = stats["time_train"]
    start = time.perf_counter()
    progress = progress_bar(len(loader), f"epoch {state['epoch']} train")
    progress.update(state["step"])
    loader.start_at(state["batch"])
    for batch in loader:
        loss = algorithm.loss(model, batch)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(f"the loss became {loss_value} at epoch {state['epoch']}, step {state['step']}; "
                                     f"training stopped and the last checkpoint was kept. Lower --lr, or resume "
                                     f"from that checkpoint")
        if rate_at is not None:
            stats["lr"] = rate_at(state["epoch"] + batch.number / max(1, len(loader)))
            set_learning_rate(optimizers, stats["lr"])
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        stats = _merge(stats, algorithm.after_step(state["global_step"] + 1))
        images = batch.images.shape[0]
        stats["loss_sum"] += loss_value * images
        stats["images"] += images
        stats["steps"] += 1
        state["step"] += 1
        state["batch"] = batch.number + 1
        state["global_step"] += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.3f}")
        stats["time_train"] = time_before + time.perf_counter() - start
        on_step(stats)
    progress.close()
    stats["time_train"] = time_before + time.perf_counter() - start
    return stats


def _merge(total: dict, part: dict) -> dict:
    return {**total, **{key: total.get(key, 0) + value for key, value in part.items()}}


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def train(args) -> dict:
    # -- stage 1: set-up ---------------------------------------------------------------------------------------
    rank, world_size, device = set_up(args)

    # -- stage 2: data ------------------------------------------------------------------------------------------
    index = build_index(args)
    num_images = len(index)
    algorithm_class = ALGORITHMS[args.algo]
    algorithm = algorithm_class(args, num_images, device)
    feature_loader, train_loader = build_loaders(args, index, algorithm, rank, world_size, device)
    loaders = Loaders(feature=feature_loader, train=train_loader, num_images=num_images, device=device)
    true_labels = None if index.labels is None else torch.as_tensor(np.asarray(index.labels), dtype=torch.int64)
    output = make_output(args, rank)
    log = JsonLinesLog(output / "log.jsonl")
    outputs = RunOutputs(output, enabled=rank == 0, plots=not args.no_plots, tensorboard=args.tensorboard)

    # -- stage 3: model and optimizers ---------------------------------------------------------------------------
    model, optimizer, head_optimizer = build_training_model(args, algorithm)

    # -- stage 4: resume ------------------------------------------------------------------------------------------
    state = {"epoch": 0, "step": 0, "batch": 0, "global_step": 0, "previous_assignments": None, "partial": {},
             "cluster_record": {}}
    checkpoint_path = output / "checkpoint.pt"
    resume = args.resume
    if resume == "auto":
        resume = str(checkpoint_path) if checkpoint_path.exists() else None
    if resume:
        saved = load_checkpoint(resume, map_location="cpu")
        check_compatible(saved["args"], vars(args), resume)
        algorithm_state = algorithm_state_of(saved, algorithm_class, resume)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if head_optimizer is not None:
            head_optimizer.load_state_dict(saved["head_optimizer"])
        algorithm.load_state_dict(algorithm_state)
        for key in state:
            # "batch" is new: before it, a resumed epoch counted its batches again (as many as its steps).
            state[key] = saved[key] if key in saved else saved["step"]
        rng_note = restore_rank_rng(saved, args.seed, rank, world_size, resume)
        if rank == 0:
            log.truncate_after_epoch(state["epoch"])
            log.write({"event": "resumed", "epoch": state["epoch"], "step": state["step"],
                       "global_step": state["global_step"], "checkpoint": str(resume)})
            outputs.note(f"resumed from {resume} at epoch {state['epoch']}, step {state['step']}{rng_note}")
    training_model = _wrap(model, device)

    def rate_at(progress: float) -> float:
        return learning_rate(args.lr, progress, args.epochs, args.lr_schedule, args.warmup_epochs)

    def save(tag: str) -> None:
        rng_ranks = dist_utils.all_gather_objects(capture_rng_state())  # collective: every rank takes part
        if rank != 0:
            return
        save_checkpoint({
            "format_version": FORMAT_VERSION, "pydc_version": __version__,
            "args": {key: value for key, value in vars(args).items()},
            "epoch": state["epoch"], "step": state["step"], "batch": state["batch"],
            "global_step": state["global_step"],
            "world_size": world_size, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "head_optimizer": None if head_optimizer is None else head_optimizer.state_dict(),
            # Every rank's generators, in rank order; a resume restores each rank's own ("rng": rank 0's, which
            # is what checkpoints before per-rank states held).
            "rng": rng_ranks[0], "rng_ranks": rng_ranks,
            "algorithm": algorithm.state_dict(),
            # A copy of the algorithm's current clusters for tools that read checkpoints (plots, analysis).
            "assignments": algorithm.assignments(), "previous_assignments": state["previous_assignments"],
            "partial": state["partial"], "cluster_record": state["cluster_record"], "tag": tag,
            # The sampler's order is a function of (seed, epoch, algorithm state); its position is what this rank
            # has consumed of it (a resume starts the loader there without reading what lies before).
            "sampler": {"seed": args.seed, "epoch": state["epoch"], "position": state["batch"] * args.batch_size},
        }, checkpoint_path)

    def stop_if_preempted(guard, saved: bool) -> None:
        """After a step or an epoch: on a preemption signal (every rank agrees), checkpoint, log and stop."""
        signal_number = guard.stop_requested()
        if signal_number is None:
            return
        if not saved:
            save("preempted")
        name = signal.Signals(signal_number).name
        if rank == 0:
            log.write({"event": "preempted", "signal": name, "epoch": state["epoch"], "step": state["step"],
                       "global_step": state["global_step"], "checkpoint": str(checkpoint_path)})
        raise Preempted(signal_number, f"{name} received: stopped after epoch {state['epoch']}, step "
                                       f"{state['step']} (global step {state['global_step']}) and wrote "
                                       f"{checkpoint_path}; continue with --resume auto")

    # -- stage 5: epochs ------------------------------------------------------------------------------------------
    try:
        with PreemptionGuard(device, distributed=world_size > 1, rank=rank) as guard:
            while state["epoch"] < args.epochs:
                epoch = state["epoch"]
                epoch_start = time.perf_counter()
                fresh_epoch = state["step"] == 0
                if fresh_epoch:
                    state["partial"] = {}
                    _share_buffers(model)
                    state["cluster_record"] = _begin_epoch(algorithm, epoch, loaders, args, world_size)
                order = algorithm.order(epoch, rank, world_size)
                train_loader.set_epoch(epoch)
                train_loader.set_order(order)
                if fresh_epoch and algorithm.reset_head_optimizer:
                    # The algorithm re-initialised its head in begin_epoch: a fresh optimizer goes with it; a resumed
                    # epoch keeps the loaded one.
                    head_optimizer = _head_optimizer(args, optimizer_parameters(head_optimizer))

                def on_step(stats):
                    state["partial"] = dict(stats)
                    saved = bool(args.checkpoint_steps) and state["global_step"] % args.checkpoint_steps == 0
                    if saved:
                        save("step")
                    guard.after_step(state["global_step"])
                    stop_if_preempted(guard, saved)

                optimizers = [optimizer] + ([head_optimizer] if head_optimizer is not None else [])
                totals = train_one_epoch(algorithm, training_model, train_loader, optimizers, state, on_step,
                                         totals=state["partial"], rate_at=rate_at)
                record = _epoch_record(args, algorithm, state, totals, true_labels, time.perf_counter() - epoch_start)
                assignments = algorithm.assignments()
                if rank == 0:
                    log.write(record)
                    outputs.epoch_end(record, assignments, args.k, log.read())
                state["previous_assignments"] = assignments
                state["epoch"] += 1
                state["step"] = 0
                state["batch"] = 0
                state["partial"] = {}
                save("epoch")
                if rank == 0:
                    keep_epoch_checkpoint(checkpoint_path, state["epoch"] - 1, args.keep_checkpoints)
                stop_if_preempted(guard, saved=True)  # before the next epoch's feature pass and clustering
    except NonFiniteLossError as error:
        if rank == 0:
            log.write({"epoch": state["epoch"], "event": "stopped", "reason": str(error)})
        raise

    # -- stage 6: final evaluation -------------------------------------------------------------------------------
    final = {"event": "final", "epoch": state["epoch"], "images": num_images, "world_size": world_size,
             "pydc_version": __version__}
    assignments = algorithm.assignments()
    if world_size > 1 and assignments is not None:
        # Every rank must hold the same algorithm state (clusters, memories, prototypes) and assignments.
        final["ranks_agree"] = _ranks_agree([assignments, *_tensors(algorithm.state_dict())], device)
        (output / "assignments").mkdir(parents=True, exist_ok=True)
        np.save(output / "assignments" / f"final.rank{rank}.npy", assignments.cpu().numpy())
    if not args.no_eval and true_labels is not None:
        model.eval()
        features = compute_features(model.backbone.features, feature_loader, num_images, device)
        if rank == 0:
            from pydc.eval import evaluate_features

            final.update(evaluate_features(features, true_labels, seed=args.seed))  # fixed protocol
    if rank == 0:
        log.write(final)
        outputs.final(index, assignments, args.k)
    dist_utils.barrier()
    return final


def optimizer_parameters(optimizer) -> list:
    return [] if optimizer is None else [p for group in optimizer.param_groups for p in group["params"]]


def _epoch_record(args, algorithm, state, totals, true_labels, seconds) -> dict:
    from pydc.cluster import cluster_size_stats, nmi

    assignments = algorithm.assignments()
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
    record.update(algorithm.epoch_record(totals))
    record["lr"] = totals.get("lr", args.lr)  # the rate of the epoch's last step
    return record


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor in a nest of dicts/lists/tuples, in a fixed order."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        return [tensor for key in sorted(value, key=str) for tensor in _tensors(value[key])]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


def _ranks_agree(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """True when every rank holds exactly rank 0's tensors."""
    agree = True
    for tensor in tensors:
        local = tensor.detach().to(device).contiguous()
        reference = local.clone()
        dist_utils.broadcast_tensor(reference, 0)
        agree = agree and torch.equal(reference, local)
    flag = torch.tensor([int(agree)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _share_buffers(model) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics) before an epoch's feature pass. DDP broadcasts them
    at the start of each forward, so after an epoch's last step every rank holds its own last update; a resumed
    run holds rank 0's (the checkpoint's) on every rank. Sharing them makes both runs compute the same features."""
    if dist_utils.is_distributed():
        for buffer in model.buffers():
            dist_utils.broadcast_tensor(buffer.data, 0)


def _begin_epoch(algorithm, epoch: int, loaders: Loaders, args, world_size: int) -> dict:
    """algorithm.begin_epoch, then (or when it failed) the check that its feature pass, if it made one, decoded
    at least --k images over all ranks: a folder of mostly bad files otherwise fails deep in PCA or k-means."""
    try:
        record = algorithm.begin_epoch(epoch, loaders)
    except TrainingError:
        _require_enough_images(loaders.feature, args, world_size, loaders.device)
        raise
    _require_enough_images(loaders.feature, args, world_size, loaders.device)
    return record


def _require_enough_images(feature_loader, args, world_size: int, device) -> None:
    stats = feature_loader.stats
    if stats["decoded"] + stats["skipped"] == 0:  # no feature pass this epoch
        return
    if world_size > 1:  # every rank reaches this point (the feature pass and clustering are collective)
        decoded = torch.tensor([stats["decoded"]], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(decoded)
        stats = {**stats, "decoded": int(decoded.item())}
    try:
        require_enough_images(stats, args.k, args.data or "the bundled digits")
    except NoUsableImages as error:
        raise TrainingError(str(error)) from None


def main(argv=None) -> int:
    args = parse_args(argv)
    final = None
    try:
        final = train(args)
        is_main = dist_utils.is_main_process()
    except (TrainingError, CheckpointError, FloatingPointError) as error:
        print(f"pydc.train: error: {error}", file=sys.stderr)
        return 2
    except Preempted as preempted:
        print(f"pydc.train: preempted: {preempted}", file=sys.stderr)
        return preempted.exit_status
    finally:
        dist_utils.cleanup()
    if final and is_main:
        import json

        print(json.dumps({key: value for key, value in final.items() if not isinstance(value, dict)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
