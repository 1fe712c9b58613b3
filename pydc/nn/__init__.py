"""Neural-network modules built on pydc's ops."""

from pydc.nn.sobel import SobelStem

__all__ = ["SobelStem"]
