"""Typed wrappers over torch.ops.pydc.*, their fake kernels and autograd, and pure-torch references.

Each op module documents the op's semantics; its `*_reference` function is that semantics in plain torch,
the oracle of the tests and the fallback when the compiled library is not built.
"""

from pydc.ops.sobel import IMAGENET_MEAN, IMAGENET_STD, sobel_normalize, sobel_normalize_reference

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "sobel_normalize", "sobel_normalize_reference"]
from pydc.ops.pca import pca_accumulate, pca_accumulate_reference, pca_transform, pca_transform_reference

__all__ += ["pca_accumulate", "pca_accumulate_reference", "pca_transform", "pca_transform_reference"]
