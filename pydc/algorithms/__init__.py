"""Training algorithms as plug-ins of the generic trainer (pydc/train.py); the interface is in base.py.

ALGORITHMS maps each --algo name to its class: one module per algorithm, each readable on its own.
"""

from pydc.algorithms.base import Algorithm, Loaders, TrainingError
from pydc.algorithms.dcv2 import DeepClusterV2
from pydc.algorithms.deepcluster import DeepCluster
from pydc.algorithms.odc import ODC

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (DeepCluster, ODC, DeepClusterV2)}

__all__ = ["ALGORITHMS", "Algorithm", "Loaders", "TrainingError"]
