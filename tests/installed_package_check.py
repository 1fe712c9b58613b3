"""Run by tests/test_install.py with the Python of a virtual environment that has only torch and an installed
pydc wheel, from a folder outside the checkout: what a project using pydc would do first.

    python installed_package_check.py CHECKOUT

Prints one line per check and "all checks passed" at the end; any failure raises.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

import torch

import pydc
from pydc import ops
from pydc.nn import SobelStem


def check_installed_copy(checkout: Path) -> None:
    location = Path(pydc.__file__).resolve()
    assert checkout.resolve() not in location.parents, f"pydc imported from the checkout: {location}"
    assert "site-packages" in location.parts, f"pydc not imported from an installed copy: {location}"
    assert pydc.extension.has_ops(), pydc.extension.load_error()
    built = pydc.extension.build_info()
    assert built["pydc"] == pydc.__version__ and built["torch"] == torch.__version__, built
    print(f"pydc {pydc.__version__} from {location.parent}, built for torch {built['torch']}")


def import_every_public_module() -> None:
    names = [module.name for module in pkgutil.walk_packages(pydc.__path__, prefix="pydc.")
             if not any(part.startswith("_") for part in module.name.split("."))]
    for name in names:
        importlib.import_module(name)
    assert {"pydc.cluster.kmeans", "pydc.data.loaders", "pydc.train", "pydc.info"} <= set(names), names
    print(f"imported {len(names)} public modules")


def _close(name: str, got, expected, **tolerance) -> None:
    torch.testing.assert_close(got, expected, **tolerance, msg=lambda message: f"{name}: {message}")


def check_ops_against_references() -> None:
    generator = torch.Generator().manual_seed(0)

    images = torch.randint(0, 256, (2, 3, 9, 11), dtype=torch.uint8, generator=generator)
    _close("sobel_normalize", ops.sobel_normalize(images, ops.IMAGENET_MEAN, ops.IMAGENET_STD),
           ops.sobel_normalize_reference(images, ops.IMAGENET_MEAN, ops.IMAGENET_STD), rtol=1e-5, atol=1e-5)

    batch = torch.randn(50, 6, generator=generator)
    states = [[torch.zeros(6, dtype=torch.float64), torch.zeros(6, 6, dtype=torch.float64),
               torch.zeros(1, dtype=torch.int64)] for _ in range(2)]
    shift = batch[0].double()
    ops.pca_accumulate(batch, shift, *states[0])
    ops.pca_accumulate_reference(batch, shift, *states[1])
    for got, expected in zip(states[0], states[1]):
        # The kernel fills the Gram's upper triangle (see pydc.ops.pca); compare that.
        if got.dim() == 2:
            got, expected = got.triu(), expected.triu()
        _close("pca_accumulate", got, expected, rtol=1e-5, atol=1e-4)

    mean, projection = batch.double().mean(0), torch.randn(3, 6, generator=generator)
    _close("pca_transform", ops.pca_transform(batch, mean, projection),
           ops.pca_transform_reference(batch, mean, projection), rtol=1e-5, atol=1e-6)

    points, centroids = torch.randn(64, 5, generator=generator), torch.randn(4, 5, generator=generator)
    labels, distances = ops.kmeans_assign(points, centroids)
    expected_labels, expected_distances = ops.kmeans_assign_reference(points, centroids)
    assert torch.equal(labels, expected_labels), "kmeans_assign: labels differ from the reference"
    _close("kmeans_assign", distances, expected_distances, rtol=1e-5, atol=1e-5)
    _close("kmeans_update", ops.kmeans_update(points, labels, 4),
           ops.kmeans_update_reference(points, labels, 4), rtol=1e-5, atol=1e-6)

    length, dim, classes = 40, 8, 3
    bank = torch.randn(length, dim, dtype=torch.float64, generator=generator)
    bank = torch.nn.functional.normalize(bank).float()
    label_bank = torch.randint(0, classes, (length,), generator=generator)
    memories = []
    op_pairs = ((ops.odc_class_sums, ops.odc_centroids_from_sums),
                (ops.odc_class_sums_reference, ops.odc_centroids_from_sums_reference))
    for class_sums_op, centroids_op in op_pairs:
        memory = [bank.clone(), label_bank.clone(), torch.zeros(classes, dtype=torch.int64),
                  torch.zeros(classes, dim, dtype=torch.int64), torch.zeros(classes, dim)]
        class_sums_op(memory[0], memory[1], memory[3], memory[2])
        centroids_op(memory[3], memory[2], memory[4], length)
        memories.append(memory)
    for name, got, expected in zip(("bank", "labels", "counts", "class_sums", "centroids"), *memories):
        _close(f"odc_class_sums/odc_centroids_from_sums {name}", got, expected, rtol=0, atol=0)
    indices = torch.randint(0, length, (12,), generator=generator)
    features = torch.randn(12, dim, generator=generator)
    changes = [ops.odc_update_samples(*memories[0], indices, features, 0.5),
               ops.odc_update_samples_reference(*memories[1], indices, features, 0.5)]
    _close("odc_update_samples changes", changes[0], changes[1], rtol=0, atol=0)
    _close("odc_update_samples bank", memories[0][0], memories[1][0], rtol=0, atol=2e-7)
    for name, got, expected in zip(("labels", "counts", "class_sums"), memories[0][1:4], memories[1][1:4]):
        _close(f"odc_update_samples {name}", got, expected, rtol=0, atol=0)
    print("9 ops match their references")


def check_compiled_model() -> None:
    model = torch.nn.Sequential(SobelStem(), torch.nn.Conv2d(2, 4, 3, padding=1)).eval()
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        _close("torch.compile(SobelStem + conv)", torch.compile(model, fullgraph=True)(images), model(images),
               rtol=1e-4, atol=1e-4)
    print("torch.compile(fullgraph=True) over SobelStem + conv matches eager")


if __name__ == "__main__":
    check_installed_copy(Path(sys.argv[1]))
    import_every_public_module()
    check_ops_against_references()
    check_compiled_model()
    print("all checks passed")
