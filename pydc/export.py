"""Export a checkpoint's backbone as a plain state_dict (no pydc needed to load it).

    python -m pydc.export --checkpoint runs/digits/checkpoint.pt --out backbone.pt

The file holds the trainable body only (the Sobel stem has no weights; apply it, or any grey + Sobel
filter, to the input). For `--arch resnet50` the keys are torchvision's, so it loads into a torchvision
ResNet-50 whose conv1 takes 2 channels and whose fc is an identity:

    import torch, torchvision
    net = torchvision.models.resnet50()
    net.conv1 = torch.nn.Conv2d(2, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = torch.nn.Identity()
    net.load_state_dict(torch.load("backbone.pt", weights_only=True))

For AlexNet/VGG16 (which have batch norm, unlike torchvision's) load it into pydc's body:
`pydc.models.build_model("alexnet").body.load_state_dict(torch.load("backbone.pt", weights_only=True))`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydc.utils.checkpoint import CheckpointError, atomic_save, load_checkpoint

BODY_PREFIX = "backbone.body."


def backbone_state_dict(state: dict) -> dict:
    weights = {key[len(BODY_PREFIX):]: value for key, value in state["model"].items() if key.startswith(BODY_PREFIX)}
    if not weights:
        raise CheckpointError("the checkpoint's model holds no 'backbone.body.*' weights; is it from pydc.train?")
    return weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pydc.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by pydc.train")
    parser.add_argument("--out", required=True, help="where to write the backbone state_dict (.pt)")
    args = parser.parse_args(argv)
    try:
        weights = backbone_state_dict(load_checkpoint(args.checkpoint))
    except CheckpointError as error:
        print(f"pydc.export: error: {error}", file=sys.stderr)
        return 2
    # atomic_save: a plain dict of tensors, what torch.load(weights_only=True) expects, never half written.
    path = atomic_save({key: value.contiguous() for key, value in weights.items()}, Path(args.out))
    print(f"wrote {len(weights)} tensors to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
