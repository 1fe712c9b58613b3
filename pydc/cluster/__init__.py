"""Clustering: PCA-whitening, k-means backends, DeepCluster's uniform sampler, NMI and cluster statistics."""

from pydc.cluster.kmeans import KMeansResult, kmeans
from pydc.cluster.metrics import cluster_size_stats, nmi
from pydc.cluster.pca import PCAWhitening
from pydc.cluster.sampler import UniformLabelSampler

__all__ = ["KMeansResult", "PCAWhitening", "UniformLabelSampler", "cluster_size_stats", "kmeans", "nmi"]
