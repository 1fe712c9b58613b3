"""Folders that pydc renders once (the bundled digits, the quality suite's datasets), written atomically.

A folder is rendered into a temporary sibling (".<name>-XXXX") and renamed into place when complete, marker
included, so an interrupted run leaves no half-written dataset behind (at worst a stale hidden staging folder,
which the image index ignores) and two processes racing to render it both end with the same folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

COMPLETE_MARKER = ".complete"


def render_once(target: Path, render: Callable[[Path], None], what: str) -> Path:
    """`target`, rendered by `render(staging_folder)` unless a complete render is already there."""
    if (target / COMPLETE_MARKER).exists():
        return target
    if target.exists():
        # Renders appear only through the atomic rename below, marker included: this folder is not one of ours.
        if any(target.iterdir()):
            raise ValueError(f"{str(target)!r} exists and is not a rendered {what} folder (no {COMPLETE_MARKER} "
                             f"marker); pass another root or remove it")
        target.rmdir()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        render(staging)
        (staging / COMPLETE_MARKER).touch()
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / COMPLETE_MARKER).exists():  # not another process's finished copy: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
