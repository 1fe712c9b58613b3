"""The quality suite's datasets: small labelled image folders of different kinds, built locally from a seed.

Nothing is downloaded: every set comes from the project or from files that installed packages ship.
- digits: the bundled digits (pydc.data.digits), 1797 images of 10 classes, or a stratified subset.
- shapes: procedurally drawn images, 10 generating classes (5 filled or outlined shapes, 2 strokes, 3
  textures), each with random placement, rotation, scale, colours and noise: colour carries no class.
- photo-regions: crops of 12 named regions of three photographs (scikit-learn's china.jpg and flower.jpg,
  matplotlib's grace_hopper.jpg): the pagoda, the lake, a face, a flag...; random position, size and flip.
- photo-sources: crops of 6 whole pictures, three photographs and three measured rasters that matplotlib
  ships (an MRI slice, a hill-shaded elevation model, a topography/bathymetry grid), at scales from a sixth
  to half of the picture: the class is the source, with large variation inside each class.
scikit-image's sample pictures are kept out: they are reserved for an independent check.

Each set is written once per (name, images, seed) as <cache>/quality/<name>-n<images>-s<seed>-v<version>/
<class>/<number>.png, 32x32 RGB (see pydc.data.rendered: atomic, reused by later runs).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pydc.data.cache import cache_dir
from pydc.data.rendered import render_once

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled, so that edges are anti-aliased
RENDER_VERSION = 1  # bump when a renderer changes, so that stale cached folders are not reused


@dataclass(frozen=True)
class QualityDataset:
    name: str
    classes: tuple[str, ...]
    default_images: int | None  # None: every image the source has (the digits)
    render: Callable[[Path, list[int] | None, int], None]  # (folder, images per class or None for all, seed)
    description: str


def class_counts(images: int, num_classes: int) -> list[int]:
    """`images` spread over the classes as evenly as possible (the first classes get one more)."""
    if images < 2 * num_classes:
        raise ValueError(f"need at least 2 images per class ({2 * num_classes} for {num_classes} classes), "
                         f"got --images {images}")
    return [images // num_classes + (c < images % num_classes) for c in range(num_classes)]


def build_dataset(name: str, images: int | None = None, seed: int = 0, root: Path | None = None) -> Path:
    """The folder of dataset `name` with `images` images (default: the set's size), rendered if needed."""
    if name not in DATASETS:
        raise ValueError(f"unknown quality dataset {name!r}; expected one of {', '.join(DATASETS)}")
    dataset = DATASETS[name]
    images = dataset.default_images if images is None else images
    counts = None if images is None else class_counts(images, len(dataset.classes))
    root = Path(root) if root is not None else cache_dir() / "quality"
    target = root / f"{name}-n{images or 'all'}-s{seed}-v{RENDER_VERSION}"

    def render(folder: Path) -> None:
        for class_name in dataset.classes:
            (folder / class_name).mkdir()
        dataset.render(folder, counts, seed)

    return render_once(target, render, f"quality {name}")


def _class_rng(seed: int, name: str, class_index: int) -> np.random.Generator:
    """One generator per (seed, dataset, class): a class's images do not depend on the other classes' counts."""
    return np.random.default_rng([seed, sum(name.encode()), class_index])


def _save(image: Image.Image, folder: Path, class_name: str, number: int) -> None:
    image.convert("RGB").save(folder / class_name / f"{number:05d}.png", optimize=False)


# ----------------------------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------------------------
DIGIT_CLASSES = tuple(str(digit) for digit in range(10))


def _render_digits(folder: Path, counts: list[int] | None, seed: int) -> None:
    """A seeded choice of `counts[c]` images of each digit (all 1797 images when counts is None)."""
    from pydc.data import digits_folder

    source = digits_folder()
    for class_index, class_name in enumerate(DIGIT_CLASSES):
        files = sorted((source / class_name).glob("*.png"))
        if counts is None:
            for path in files:
                shutil.copyfile(path, folder / class_name / path.name)
            continue
        if counts[class_index] > len(files):
            raise ValueError(f"digits has {len(files)} images of class {class_name}, fewer than the "
                             f"{counts[class_index]} asked for; lower --images (at most 1797)")
        order = _class_rng(seed, "digits", class_index).permutation(len(files))[:counts[class_index]]
        for position in sorted(order):
            shutil.copyfile(files[position], folder / class_name / files[position].name)


# ----------------------------------------------------------------------------------------------------------------
# shapes: procedurally drawn, random placement, rotation, scale and colours
# ----------------------------------------------------------------------------------------------------------------
SHAPE_CLASSES = ("circle", "square", "triangle", "star", "ring", "zigzag", "arc", "stripes", "checker", "dots")


def _contrasting_colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Random background and foreground colours whose luminances differ by at least 60 (of 255)."""
    weights = np.array([0.299, 0.587, 0.114])
    while True:
        background, foreground = rng.integers(0, 256, size=(2, 3))
        if abs(float(weights @ (background - foreground))) >= 60:
            return tuple(int(c) for c in background), tuple(int(c) for c in foreground)


def _polygon(centre, radius: float, angle: float, radii: list[float]) -> list[tuple[float, float]]:
    """Vertices at equal angular steps, vertex i at radius * radii[i] (a star alternates two radii)."""
    steps = len(radii)
    return [(centre[0] + radius * r * math.cos(angle + 2 * math.pi * i / steps),
             centre[1] + radius * r * math.sin(angle + 2 * math.pi * i / steps)) for i, r in enumerate(radii)]


def _texture_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a full-image texture with random orientation, period and phase."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    period = rng.uniform(0.12, 0.3) * size
    phase_u, phase_v = rng.uniform(0, period, size=2)
    if kind == "stripes":
        return ((u + phase_u) % period) < period / 2
    if kind == "checker":
        return ((np.floor((u + phase_u) / period) + np.floor((v + phase_v) / period)) % 2) == 0
    # dots: a rotated grid of discs of random radius
    radius = rng.uniform(0.18, 0.32) * period
    du = (u + phase_u) % period - period / 2
    dv = (v + phase_v) % period - period / 2
    return du * du + dv * dv < radius * radius


def _draw_shape(kind: str, rng: np.random.Generator) -> Image.Image:
    size = IMAGE_SIZE * SUPERSAMPLE
    background, foreground = _contrasting_colours(rng)
    canvas = Image.new("RGB", (size, size), background)
    if kind in ("stripes", "checker", "dots"):
        mask = Image.fromarray((_texture_mask(kind, size, rng) * 255).astype(np.uint8))
        canvas.paste(Image.new("RGB", (size, size), foreground), (0, 0), mask)
    else:
        draw = ImageDraw.Draw(canvas)
        radius = rng.uniform(0.2, 0.4) * size
        centre = rng.uniform(radius * 0.8, size - radius * 0.8, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        stroke = max(2, int(rng.uniform(0.06, 0.12) * size))
        box = (centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius)
        if kind == "circle":
            draw.ellipse(box, fill=foreground)
        elif kind == "square":
            draw.polygon(_polygon(centre, radius, angle, [1.0] * 4), fill=foreground)
        elif kind == "triangle":
            draw.polygon(_polygon(centre, radius, angle, [1.0] * 3), fill=foreground)
        elif kind == "star":
            draw.polygon(_polygon(centre, radius, angle, [1.0, 0.42] * 5), fill=foreground)
        elif kind == "ring":
            draw.ellipse(box, outline=foreground, width=stroke)
        elif kind == "zigzag":
            corners = int(rng.integers(4, 7))
            along = np.linspace(-radius, radius, corners)
            across = np.where(np.arange(corners) % 2 == 0, -1.0, 1.0) * radius * rng.uniform(0.3, 0.6)
            cos, sin = math.cos(angle), math.sin(angle)
            points = [(centre[0] + a * cos - b * sin, centre[1] + a * sin + b * cos) for a, b in zip(along, across)]
            draw.line(points, fill=foreground, width=stroke, joint="curve")
        elif kind == "arc":
            start = math.degrees(angle)
            draw.arc(box, start, start + rng.uniform(160, 260), fill=foreground, width=stroke)
        else:
            raise ValueError(f"unknown shape class {kind!r}")
    noisy = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 10, (size, size, 3)).astype(np.float32)
    canvas = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def _render_shapes(folder: Path, counts: list[int], seed: int) -> None:
    for class_index, kind in enumerate(SHAPE_CLASSES):
        rng = _class_rng(seed, "shapes", class_index)
        for number in range(counts[class_index]):
            _save(_draw_shape(kind, rng), folder, kind, number)


# ----------------------------------------------------------------------------------------------------------------
# Photographs and measured rasters that installed packages ship
# ----------------------------------------------------------------------------------------------------------------
def _sklearn_photo(name: str) -> Image.Image:
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image(name))


def _matplotlib_sample(name: str):
    import matplotlib.cbook

    return matplotlib.cbook.get_sample_data(name)


def _grace_hopper() -> Image.Image:
    with _matplotlib_sample("grace_hopper.jpg") as file:
        return Image.open(file).convert("RGB")


def _mri_slice() -> Image.Image:
    """matplotlib's 256x256 16-bit MRI slice, grey, contrast-stretched to its 1st-99.5th percentiles."""
    with _matplotlib_sample("s1045.ima.gz") as file:
        pixels = np.frombuffer(file.read(), np.uint16).reshape(256, 256).astype(np.float64)
    low, high = np.percentile(pixels, [1, 99.5])
    grey = np.clip((pixels - low) / max(high - low, 1.0), 0, 1)
    return Image.fromarray((grey * 255).astype(np.uint8)).convert("RGB").resize((512, 512), Image.Resampling.BICUBIC)


def _coloured_raster(values: np.ndarray, colormap: str, hillshade: bool, size: tuple[int, int]) -> Image.Image:
    import matplotlib
    from matplotlib.colors import LightSource, Normalize

    cmap = matplotlib.colormaps[colormap]
    values = values.astype(np.float64)
    if hillshade:
        rgb = LightSource(azdeg=315, altdeg=45).shade(values, cmap=cmap, blend_mode="overlay", vert_exag=0.05)
    else:
        rgb = cmap(Normalize()(values))
    image = Image.fromarray((np.clip(rgb[..., :3], 0, 1) * 255).astype(np.uint8))
    return image.resize(size, Image.Resampling.BICUBIC)


def _elevation_model() -> Image.Image:
    """matplotlib's Jacksboro fault elevation model, hill-shaded over gist_earth (its shading example)."""
    elevation = _matplotlib_sample("jacksboro_fault_dem.npz")["elevation"]
    return _coloured_raster(elevation, "gist_earth", hillshade=True, size=(806, 688))


def _topography() -> Image.Image:
    """matplotlib's 91x120 topography/bathymetry grid, coloured with the terrain map."""
    topography = _matplotlib_sample("topobathy.npz")["topo"]
    return _coloured_raster(topography, "terrain", hillshade=False, size=(480, 364))


_PICTURES: dict[str, Callable[[], Image.Image]] = {
    "china": lambda: _sklearn_photo("china.jpg"),
    "flower": lambda: _sklearn_photo("flower.jpg"),
    "hopper": _grace_hopper,
    "mri": _mri_slice,
    "elevation": _elevation_model,
    "topography": _topography,
}

# Named regions of the three photographs, as (picture, [(left, top, right, bottom), ...]) in source pixels.
# Boxes were drawn by eye on china.jpg (640x427), flower.jpg (640x427) and grace_hopper.jpg (512x600).
PHOTO_REGIONS: dict[str, tuple[str, list[tuple[int, int, int, int]]]] = {
    "china-sky": ("china", [(360, 0, 640, 180)]),
    "china-pagoda": ("china", [(90, 100, 340, 330)]),
    "china-lake": ("china", [(340, 215, 545, 292)]),
    "china-trees": ("china", [(380, 300, 640, 427), (0, 330, 200, 427), (550, 140, 640, 300)]),
    "flower-petals": ("flower", [(200, 110, 410, 320)]),
    "flower-bud": ("flower", [(285, 372, 470, 427)]),
    "flower-leaves": ("flower", [(0, 0, 160, 427), (460, 0, 640, 360)]),
    "hopper-flag": ("hopper", [(0, 0, 130, 420)]),
    "hopper-cap": ("hopper", [(150, 20, 360, 140)]),
    "hopper-face": ("hopper", [(170, 140, 360, 320)]),
    "hopper-sky": ("hopper", [(390, 20, 512, 330)]),
    "hopper-uniform": ("hopper", [(40, 400, 480, 600)]),
}
SOURCE_CLASSES = tuple(_PICTURES)


def _random_crop(picture: Image.Image, box, side_range: tuple[float, float], rng: np.random.Generator) -> Image.Image:
    """A square crop inside `box` with side = (uniform in side_range) x the box's shorter side, resized to
    32x32 (antialiased), flipped left-right with probability 1/2."""
    left, top, right, bottom = box
    side = rng.uniform(*side_range) * min(right - left, bottom - top)
    x = rng.uniform(left, right - side)
    y = rng.uniform(top, bottom - side)
    crop = picture.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS, box=(x, y, x + side, y + side))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def _render_photo_regions(folder: Path, counts: list[int], seed: int) -> None:
    pictures = {name: _PICTURES[name]() for name in {picture for picture, _ in PHOTO_REGIONS.values()}}
    for class_index, (class_name, (picture_name, boxes)) in enumerate(PHOTO_REGIONS.items()):
        rng = _class_rng(seed, "photo-regions", class_index)
        areas = np.array([(r - l) * (b - t) for l, t, r, b in boxes], dtype=np.float64)
        for number in range(counts[class_index]):
            box = boxes[rng.choice(len(boxes), p=areas / areas.sum())]
            _save(_random_crop(pictures[picture_name], box, (0.4, 0.9), rng), folder, class_name, number)


def _render_photo_sources(folder: Path, counts: list[int], seed: int) -> None:
    for class_index, class_name in enumerate(SOURCE_CLASSES):
        picture = _PICTURES[class_name]()
        rng = _class_rng(seed, "photo-sources", class_index)
        for number in range(counts[class_index]):
            _save(_random_crop(picture, (0, 0, *picture.size), (1 / 6, 0.5), rng), folder, class_name, number)


DATASETS: dict[str, QualityDataset] = {
    dataset.name: dataset for dataset in (
        QualityDataset("digits", DIGIT_CLASSES, None, _render_digits,
                       "scikit-learn's 1797 handwritten digits, 8x8 upsampled to 32x32 (pydc's bundled set)"),
        QualityDataset("shapes", SHAPE_CLASSES, 1200, _render_shapes,
                       "drawn shapes, strokes and textures; random placement, rotation, scale, colours, noise"),
        QualityDataset("photo-regions", tuple(PHOTO_REGIONS), 1200, _render_photo_regions,
                       "crops of 12 named regions of 3 photographs (china, flower, grace_hopper)"),
        QualityDataset("photo-sources", SOURCE_CLASSES, 1200, _render_photo_sources,
                       "crops of 3 photographs and 3 measured rasters (MRI, elevation, topography): class = source"),
    )
}
