"""pydc: DeepCluster and Online Deep Clustering with fused C++/CUDA ops.

`import pydc` loads the compiled ops (torch.ops.pydc.*) when they are built; `pydc.extension.has_ops()`
tells whether they are, and `pydc.extension.load_error()` why not.
"""

import os

# scipy's OpenBLAS computes the CPU PCA Gram (pydc.ops.pca.use_cpu_syrk). Its worker threads busy-wait
# 2^28 cycles (~0.1 s) after every call by default, taking a core from torch's threads in between: a
# 50,000 x 2048 -> 256 PCA fit + transform took 2.7 s with that and 2.2 s with 2^20 cycles (~0.3 ms) on the
# 2-core EPYC. OpenBLAS reads the variable when it loads, so this acts only where scipy's BLAS loads after
# pydc; a value already in the environment wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

from pydc import extension, ops  # noqa: E402
from pydc import nn  # noqa: E402

__version__ = "0.1.0"

__all__ = ["extension", "nn", "ops", "__version__"]
