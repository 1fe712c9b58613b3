"""Data: image-folder indexing, DALI and torchvision loaders, bundled demo data.

- ImageFolderIndex(root): sorted image paths, labels from class subfolders, scan cached on disk.
- FeatureLoader / TrainLoader: uint8 (B, 3, size, size) Batch objects on the device, with dataset indices.
- digits_folder(): scikit-learn's digits as a folder of 32x32 PNGs (the default training data).
- synthetic_jpegs(root, n): photo-like JPEGs for throughput benchmarks.
"""

from pydc.data.digits import digits_folder
from pydc.data.index import ImageFolderIndex
from pydc.data.loaders import Batch, FeatureLoader, TrainLoader
from pydc.data.synthetic import synthetic_jpegs

__all__ = ["Batch", "FeatureLoader", "ImageFolderIndex", "TrainLoader", "digits_folder", "synthetic_jpegs"]
