"""pydc: DeepCluster and Online Deep Clustering with fused C++/CUDA ops.

`import pydc` loads the compiled ops (torch.ops.pydc.*) when they are built; `pydc.extension.has_ops()`
tells whether they are, and `pydc.extension.load_error()` why not. `pydc.info()` (or `python -m pydc.info`)
reports the version, what the library was built for, its kernels and the optional backends found.
"""

import os
import sys

# scipy's OpenBLAS computes the CPU PCA Gram (pydc.ops.pca.use_cpu_syrk). Its worker threads busy-wait
# 2^28 cycles (~0.1 s) after every call by default, taking a core from torch's threads in between: a
# 50,000 x 2048 -> 256 PCA fit + transform took 2.7 s with that and 2.2 s with 2^20 cycles (~0.3 ms) on the
# 2-core EPYC. OpenBLAS reads the variable when it loads, so this acts only where scipy's BLAS loads after
# pydc; a value already in the environment wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

from pydc._version import __version__  # noqa: E402
from pydc import extension, ops  # noqa: E402
from pydc import nn  # noqa: E402

__all__ = ["extension", "info", "nn", "ops", "__version__"]


def __getattr__(name: str):
    # pydc.info is imported on first use, not here: `python -m pydc.info` runs that module as __main__, which
    # runpy warns about when the package import has already loaded it. The module is callable: pydc.info().
    if name == "info":
        import pydc.info

        return sys.modules["pydc.info"]
    raise AttributeError(f"module 'pydc' has no attribute {name!r}")
