"""Where pydc keeps what it computes once: $PYDC_CACHE, else ~/.cache/pydc."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("PYDC_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "pydc"
