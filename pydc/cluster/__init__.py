"""Clustering: PCA-whitening, k-means backends, DeepCluster's uniform sampler, NMI and cluster statistics."""

from pydc.cluster.pca import PCAWhitening

__all__ = ["PCAWhitening"]
