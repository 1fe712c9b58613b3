"""pydc: DeepCluster and Online Deep Clustering with fused C++/CUDA ops.

`import pydc` loads the compiled ops (torch.ops.pydc.*) when they are built; `pydc.extension.has_ops()`
tells whether they are, and `pydc.extension.load_error()` why not.
"""

from pydc import extension, ops
from pydc import nn

__version__ = "0.1.0"

__all__ = ["extension", "nn", "ops", "__version__"]
