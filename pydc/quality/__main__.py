"""`python -m pydc.quality`: the quality suite (see pydc.quality)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from pydc.quality.datasets import DATASETS


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pydc.quality",
        description="Train every algorithm with its defaults on several small labelled datasets, beside "
                    "raw-pixel k-means, a random network and UMAP + k-means; write results.{md,json,png}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma-separated subset of {', '.join(DATASETS)}")
    parser.add_argument("--algos", default=None,
                        help="comma-separated --algo values of pydc.train (default: all of its choices)")
    parser.add_argument("--output", default="runs/quality", help="folder for the report and the training runs")
    parser.add_argument("--images", type=int, default=None,
                        help="images per dataset (default: each dataset's own size: all 1797 digits, 1200 otherwise)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the datasets, the trainer and the evaluation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in every training run")
    parser.add_argument("--train-args", default="",
                        help="extra flags for every training run, as one string (e.g. \"--epochs 1\")")
    parser.add_argument("--no-umap", action="store_true", help="skip the UMAP + k-means baseline")
    parser.add_argument("--dataset-root", default=None,
                        help="where the datasets are rendered (default: <PYDC_CACHE or ~/.cache/pydc>/quality)")
    return parser


def main(argv=None) -> int:
    from pydc.quality.report import write_report
    from pydc.quality.runner import QualityRunError, SuiteConfig, run_suite, trainer_algorithms

    args = get_args_parser().parse_args(argv)
    if args.threads < 1:
        print(f"pydc.quality: error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    config = SuiteConfig(
        datasets=[name for name in args.datasets.split(",") if name],
        algorithms=[name for name in args.algos.split(",") if name] if args.algos else trainer_algorithms(),
        output=Path(args.output), images=args.images, seed=args.seed, threads=args.threads,
        train_args=shlex.split(args.train_args), umap=not args.no_umap,
        dataset_root=Path(args.dataset_root) if args.dataset_root else None)
    try:
        document = run_suite(config, log=lambda message: print(message, file=sys.stderr, flush=True),
                             on_dataset_done=lambda partial: write_report(partial, config.output))
    except (ValueError, QualityRunError) as error:
        print(f"pydc.quality: error: {error}", file=sys.stderr)
        return 2
    paths = write_report(document, config.output)
    print(paths["markdown"].read_text())
    print(f"wrote {', '.join(str(path) for path in paths.values())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
