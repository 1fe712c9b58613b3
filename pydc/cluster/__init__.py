"""Clustering: PCA-whitening, k-means backends, DeepCluster's uniform sampler, NMI and cluster statistics."""
