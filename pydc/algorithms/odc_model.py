"""ODC's network: backbone -> neck (fc, BN, ReLU, dropout, fc, ReLU) -> head Linear(256, k).

As in MMSelfSup's ODC (Zhan et al., 2020) the neck maps the backbone features (2048-d for ResNet-50; the
backbone's `feature_dim` otherwise) to 512 and then to the 256-d features that the memory bank stores
(L2-normalised by the memory); the head classifies them into the memory's k clusters.
"""

from __future__ import annotations

import torch
from torch import nn


# How the neck's and the head's linear layers start. mmselfsup: weights N(0, 0.01), biases 0 (MMSelfSup's and
# OpenSelfSup's ODC). torch: PyTorch's own Linear initialisation (Kaiming-uniform with a = sqrt(5)). With the
# mmselfsup init the backbone's gradient passes through two 0.01-scale layers (fc1, head) where DeepCluster's
# passes through one: at the start of training it is ~18x smaller than DeepCluster's on the `small` net.
LINEAR_INITS = ("mmselfsup", "torch")


def init_linear(layer: nn.Linear, init: str) -> None:
    if init == "mmselfsup":
        nn.init.normal_(layer.weight, 0.0, 0.01)
        nn.init.zeros_(layer.bias)
    elif init == "torch":
        layer.reset_parameters()
    else:
        raise ValueError(f"ODC linear init: expected one of {LINEAR_INITS}, got {init!r}")


class ODCNeck(nn.Module):
    def __init__(self, in_features: int, hidden_features: int = 512, out_features: int = 256, dropout: float = 0.5,
                 init: str = "mmselfsup"):
        super().__init__()
        self.fc0 = nn.Linear(in_features, hidden_features)
        self.bn0 = nn.BatchNorm1d(hidden_features)
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(hidden_features, out_features)
        for layer in (self.fc0, self.fc1):
            init_linear(layer, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(torch.relu(self.bn0(self.fc0(x))))
        return torch.relu(self.fc1(x))


class ODCModel(nn.Module):
    """`forward(images)` returns (neck features, logits): the memory takes the first, the loss the second."""

    def __init__(self, backbone: nn.Module, num_clusters: int, hidden_features: int = 512, out_features: int = 256,
                 dropout: float = 0.5, init: str = "mmselfsup"):
        super().__init__()
        self.backbone = backbone
        self.neck = ODCNeck(backbone.feature_dim, hidden_features, out_features, dropout, init)
        self.head = nn.Linear(out_features, num_clusters)
        init_linear(self.head, init)
        self.feature_dim = out_features

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(images)
        return features, self.head(features)
