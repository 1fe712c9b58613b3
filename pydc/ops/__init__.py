"""Typed wrappers over torch.ops.pydc.*, their fake kernels and autograd, and pure-torch references.

Each op module documents the op's semantics; its `*_reference` function is that semantics in plain torch,
the oracle of the tests and the fallback when the compiled library is not built.
"""

from pydc.ops.kmeans import kmeans_assign, kmeans_assign_reference, kmeans_update, kmeans_update_reference
from pydc.ops.odc import (
    odc_centroids_from_sums,
    odc_centroids_from_sums_reference,
    odc_class_sums,
    odc_class_sums_reference,
    odc_update_samples,
    odc_update_samples_reference,
)
from pydc.ops.pca import pca_accumulate, pca_accumulate_reference, pca_transform, pca_transform_reference
from pydc.ops.sobel import IMAGENET_MEAN, IMAGENET_STD, sobel_normalize, sobel_normalize_reference

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "kmeans_assign",
    "kmeans_assign_reference",
    "kmeans_update",
    "kmeans_update_reference",
    "odc_centroids_from_sums",
    "odc_centroids_from_sums_reference",
    "odc_class_sums",
    "odc_class_sums_reference",
    "odc_update_samples",
    "odc_update_samples_reference",
    "pca_accumulate",
    "pca_accumulate_reference",
    "pca_transform",
    "pca_transform_reference",
    "sobel_normalize",
    "sobel_normalize_reference",
]
