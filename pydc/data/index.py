"""ImageFolderIndex: the sorted list of image files under a folder, with labels from class subfolders.

Layout: a folder with subfolders is a class folder (labels = position of the subfolder's name in the sorted
list of subfolders; images may sit at any depth below it; images directly in the root are ignored, with a
warning). A folder without subfolders is flat: its images have no labels. Names starting with "." are
skipped. Order: classes by name, then paths by name, so an index is the same on every machine and rank.

The scan is cached as JSON under <cache>/index/ (see pydc.data.cache), keyed by the folder's absolute path.
The cache records the modification time of every directory it listed; adding, removing or renaming a file
changes its directory's mtime, so the cache is used only when all those mtimes (and the set of directories)
still match: checking costs one stat per directory, not one per file.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from pydc.data.cache import cache_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_CACHE_VERSION = 2  # 2: dangling symlinks named like images are listed


class ImageFolderIndex:
    """Sorted image paths under `root`, with labels when the images sit in class subfolders.

    Attributes: root (Path), paths (list[str], absolute), labels (list[int] or None for a flat folder),
    classes (list[str], empty for a flat folder). `use_cache=False` always rescans and writes nothing.
    `screen=True` decodes files until one does (pydc.data.screen; usually the first) and raises
    NoUsableImages (a ValueError) with the failures' counts by kind and example paths when none does.
    """

    def __init__(self, root: str | os.PathLike, use_cache: bool = True, screen: bool = True):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(self.root)!r} does not exist or is not a directory")
        scan = _load_cached(self.root) if use_cache else None
        self.from_cache = scan is not None
        if scan is None:
            scan = _scan(self.root)
            if use_cache:
                _store(self.root, scan)
        self.classes: list[str] = scan["classes"]
        self.paths: list[str] = [str(self.root / relative) for relative in scan["paths"]]
        self.labels: list[int] | None = scan["labels"]
        if not self.paths:
            raise ValueError(f"no images found under {str(self.root)!r} (looked for files ending in "
                             f"{', '.join(IMAGE_EXTENSIONS)}, in class subfolders or directly in the folder)")
        if screen:
            from pydc.data.screen import screen_files

            screen_files(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        kind = f"{len(self.classes)} classes" if self.labels is not None else "flat, no labels"
        return f"ImageFolderIndex({str(self.root)!r}, {len(self)} images, {kind})"


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _entry_is(entry: os.DirEntry, test: str) -> bool:
    """entry.is_dir()/is_file(), False where the test itself fails (a symlink loop raises ELOOP)."""
    try:
        return getattr(entry, test)()
    except OSError:
        return False


def _scan(root: Path) -> dict:
    directories: dict[str, int] = {".": os.stat(root).st_mtime_ns}
    with os.scandir(root) as entries:
        entries = sorted(entries, key=lambda entry: entry.name)
    class_dirs = [e for e in entries if not e.name.startswith(".") and _entry_is(e, "is_dir")]
    # A dangling or looping symlink named like an image is listed (as os.walk lists it in class folders), so
    # that it is reported as unreadable with the other bad files instead of vanishing.
    root_images = [e.name for e in entries if _is_image(e.name) and not _entry_is(e, "is_dir")
                   and (_entry_is(e, "is_file") or e.is_symlink())]
    if not class_dirs:
        return {"classes": [], "paths": root_images, "labels": None, "directories": directories}
    if root_images:
        warnings.warn(f"{str(root)!r} has class subfolders; the {len(root_images)} images directly in it are "
                      f"ignored", stacklevel=3)
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        found = []
        for directory, subdirs, files in os.walk(class_dir.path):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            relative_dir = os.path.relpath(directory, root)
            directories[relative_dir] = os.stat(directory).st_mtime_ns
            found.extend(os.path.join(relative_dir, name) for name in files if _is_image(name))
        found.sort()
        paths.extend(found)
        labels.extend([label] * len(found))
    return {"classes": [d.name for d in class_dirs], "paths": paths, "labels": labels,
            "directories": directories}


def _cache_file(root: Path) -> Path:
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:16]
    return cache_dir() / "index" / f"{root.name}-{digest}.json"


def _load_cached(root: Path) -> dict | None:
    try:
        scan = json.loads(_cache_file(root).read_text())
    except (OSError, ValueError):
        return None
    if scan.get("version") != _CACHE_VERSION or scan.get("root") != str(root):
        return None
    for relative, mtime_ns in scan["directories"].items():
        try:
            if os.stat(root / relative).st_mtime_ns != mtime_ns:
                return None
        except OSError:
            return None
    return scan


def _store(root: Path, scan: dict) -> None:
    path = _cache_file(root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(json.dumps({"version": _CACHE_VERSION, "root": str(root), **scan}))
        os.replace(temporary, path)
    except OSError as error:  # a read-only home is no reason to fail: the next run scans again
        warnings.warn(f"could not write the image index cache {str(path)!r}: {error}", stacklevel=3)
