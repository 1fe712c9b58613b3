"""Every option of `python -m pydc.train` checked in one place, before any data is read or any file written.

`parse_args` (pydc.utils.options) calls `check_types` on the parsed values, fills the arch/algorithm
defaults, then calls `check_values`; either raises `OptionError`, which the parser reports as one line and
exit status 2. Flags and --config values go through the same checks: argparse converts a config's *strings*
with the option's type but never checks a config's numbers, booleans or lists, nor any choices, so
`check_types` derives what each option accepts from the parser itself (its type, its choices, store_true).
Options added to the parser later are type- and choice-checked without being listed here; `RANGES` holds the
bounds of the numeric ones.

Checks of things outside the command line stay cheap and write nothing: the device must exist, --output
must be a folder (or not exist) under a parent this user may write to (os.access, no test file), --data an
existing folder, and a --resume checkpoint is opened memory-mapped (its tensors are not read) to check its
format version and that it was written with the same algorithm, architecture, k and crop.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# The largest --lr accepted. DeepCluster/ODC use 0.05-0.06 with SGD; DeepCluster-v2's LARS uses 4.8 at
# batch 4096. A plain SGD step above 10 makes the loss non-finite within a few steps on every net here.
MAX_LR = 10
# Upper bounds for thread counts: far above any machine's cores; a typo such as 10000000 would otherwise
# make torch or the decoding pool try to create that many threads.
MAX_THREADS = 1024


class OptionError(ValueError):
    """An option value a run cannot use; the message names the option, the value and what is allowed."""


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; None is unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if value != value:  # NaN compares False with every bound
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        low, high = str(self.low), str(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


RANGES = {
    "k": Range(1),
    "pca_dim": Range(1),
    "kmeans_iters": Range(1),
    "dc_heads": Range(1),
    "odc_momentum": Range(0, 1),
    "odc_min_cluster": Range(0),
    "odc_dropout": Range(0, 1, high_open=True),
    "odc_centroid_interval": Range(1),
    "dcv2_prototypes": Range(1),
    "dcv2_temperature": Range(0, None, low_open=True),
    "dcv2_kmeans_iters": Range(1),
    "dcv2_small_crops": Range(0),
    "dcv2_small_size": Range(1),
    "dcv2_large_scale": Range(0, 1, low_open=True),
    "dcv2_small_scale": Range(0, 1, low_open=True),
    "dcv2_color_strength": Range(0),
    "crop": Range(1),
    "crop_scale": Range(0, 1, low_open=True),
    "batch_size": Range(1),
    "workers": Range(1, MAX_THREADS),
    "epochs": Range(1),
    "lr": Range(0, MAX_LR, low_open=True),
    "warmup_epochs": Range(0),
    "wd": Range(0, 1),
    "momentum": Range(0, 1, high_open=True),
    "checkpoint_steps": Range(0),
    "keep_checkpoints": Range(0),
    "seed": Range(0, 2**31 - 1),
    "threads": Range(0, MAX_THREADS),
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _origin(dest: str, value, config: dict, config_path: str | None) -> str:
    if dest in config and (config[dest] is value or config[dest] == value):
        return f" (from --config {config_path})"
    return ""


def _expected_kind(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "bool"
    if action.type is int:
        return "int"
    if action.type is float:
        return "float"
    return "str"


def _type_problem(kind: str, value) -> str | None:
    """What is wrong with `value` for an option of `kind`, or None."""
    if kind == "bool":
        return None if isinstance(value, bool) else "expected true or false"
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return "expected an integer"
        return None
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "expected a number"
        return None if math.isfinite(value) else "expected a finite number"
    return None if isinstance(value, str) else "expected a string"


def check_types(parser: argparse.ArgumentParser, args: argparse.Namespace, config: dict | None = None,
                config_path: str | None = None) -> None:
    """Each option's value has its option's type and lies among its choices (flags and --config alike)."""
    config = config or {}
    for action in parser._actions:
        dest = action.dest
        if dest in ("help", "config") or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value is None and action.default is None:
            continue  # filled from the algorithm/arch, or an optional path left out
        origin = _origin(dest, value, config, config_path)
        problem = _type_problem(_expected_kind(action), value)
        if problem:
            raise OptionError(f"{_flag(dest)}: {problem}, got {value!r}{origin}")
        if action.choices is not None and value not in action.choices:
            raise OptionError(f"{_flag(dest)}: expected one of {', '.join(map(str, action.choices))}, got "
                              f"{value!r}{origin}")
        if _expected_kind(action) == "float":
            setattr(args, dest, float(value))  # an integer from a config file


def check_values(args: argparse.Namespace, config: dict | None = None, config_path: str | None = None) -> None:
    """Ranges, the device, the paths, the model's crop and a resumed checkpoint's compatibility."""
    for dest, allowed in RANGES.items():
        value = getattr(args, dest, None)
        if value is not None and value not in allowed:
            kind = "an integer" if isinstance(value, int) else "a number"
            raise OptionError(f"{_flag(dest)}: expected {kind} {allowed.describe()}, got {value!r}"
                              f"{_origin(dest, value, config or {}, config_path)}")
    _check_device(args.device)
    _check_backends(args)
    _check_crop(args.arch, args.crop)
    _check_output(args.output)
    if args.data is not None:
        _check_data(args.data)
    _check_resume(args)


def _check_device(value: str) -> None:
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise OptionError(f"--device: expected cpu, cuda or cuda:N, got {value!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"--device: expected cpu, cuda or cuda:N, got {value!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {value}: asks for a GPU but torch sees none (torch {torch.__version__}, "
                              f"CUDA build {torch.version.cuda}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(f"--device {value}: torch sees {torch.cuda.device_count()} GPU(s), numbered from 0")


def _check_backends(args: argparse.Namespace) -> None:
    if args.data_backend == "dali":
        from pydc.data.dali_backend import dali_available

        if not dali_available():
            raise OptionError("--data-backend dali: NVIDIA DALI is not importable here (pip install "
                              "nvidia-dali-cuda130); use --data-backend torchvision or auto")
    if args.kmeans_backend == "faiss" and importlib.util.find_spec("faiss") is None:
        raise OptionError("--kmeans-backend faiss: the faiss package is not installed (pip install faiss-cpu); "
                          "use --kmeans-backend torch or auto")
    if args.cluster_on == "shard" and args.kmeans_backend == "faiss":
        raise OptionError("--cluster-on shard runs pydc's own sharded k-means (faiss cannot shard the rows); use "
                          "--kmeans-backend torch or auto with it, or --cluster-on gather for faiss")


def _check_crop(arch: str, crop: int) -> None:
    """The architecture's own size checks, run on the meta device: no weights are allocated."""
    from pydc.models import build_model

    try:
        with torch.device("meta"):
            build_model(arch, crop)
    except ValueError as error:
        raise OptionError(f"--crop {crop}: {error}") from None


def _check_output(value: str) -> None:
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise OptionError(f"--output {value}: names an existing file; expected a folder (new or existing)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OptionError(f"--output {value}: {existing} is not a folder, so the output folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OptionError(f"--output {value}: no permission to write in {existing}; choose another folder")


def _check_data(value: str) -> None:
    path = Path(value).expanduser()
    if path.is_file():
        raise OptionError(f"--data {value}: is a file; expected a folder of images (or of class sub-folders "
                          f"of images)")
    if not path.is_dir():
        raise OptionError(f"--data {value}: no such folder; expected a folder of images (or of class "
                          f"sub-folders of images)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise OptionError(f"--data {value}: no permission to read this folder")


def _check_resume(args: argparse.Namespace) -> None:
    from pydc.utils.checkpoint import CheckpointError, check_compatible, peek_checkpoint

    if args.resume is None:
        return
    if args.resume == "auto":
        path = Path(args.output).expanduser() / "checkpoint.pt"
        if not path.exists():
            return
    else:
        path = Path(args.resume).expanduser()
        if path.is_dir():
            raise OptionError(f"--resume {args.resume}: is a folder; expected a checkpoint file (e.g. "
                              f"{path / 'checkpoint.pt'}) or 'auto'")
        if not path.is_file():
            raise OptionError(f"--resume {args.resume}: no such file; expected a checkpoint.pt written by "
                              f"pydc.train, or 'auto'")
    try:
        check_compatible(peek_checkpoint(path)["args"], vars(args), path)
    except CheckpointError as error:
        raise OptionError(f"--resume {args.resume}: {error}") from None
