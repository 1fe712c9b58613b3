"""DeepCluster-v2's network: backbone -> projection head (fc, BN, ReLU, fc to 128) -> L2-normalised embedding.

As in SwAV's resnet50.py (Caron et al., 2020) the head maps the backbone's output (2048-d pooled features for
ResNet-50) through a hidden layer (2048 wide; 512 for the `small` net, whose features are 256-d) to a 128-d
embedding on the unit sphere. The prototypes are not part of the network: they are the centroids of a k-means
and are not trained (pydc/algorithms/dcv2.py holds them).

`forward(views)` takes the list of crop views of a multi-crop batch. Views of one size go through the backbone
together (one forward per run of equal sizes, as SwAV does), and the head sees every crop in one batch, so its
BatchNorm normalises over all crops. The result is (sum of view batch sizes, 128), views in the given order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc0 = nn.Linear(in_features, hidden_features)
        self.bn0 = nn.BatchNorm1d(hidden_features)
        self.fc1 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(torch.relu(self.bn0(self.fc0(x))))


class DCv2Model(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_features: int, out_features: int = 128):
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(backbone.feature_dim, hidden_features, out_features)
        self.feature_dim = out_features

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of one batch of images."""
        return F.normalize(self.head(self.backbone(images)), dim=1)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        if isinstance(views, torch.Tensor):
            views = [views]
        features, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(views[start:end])))
            start = end
        return F.normalize(self.head(torch.cat(features)), dim=1)
