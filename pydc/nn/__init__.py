"""Neural-network modules built on pydc's ops: the fixed input stems."""

from pydc.nn.rgb import STEM_NAMES, RGBStem, make_stem
from pydc.nn.sobel import SobelStem

__all__ = ["STEM_NAMES", "RGBStem", "SobelStem", "make_stem"]
