"""pydc's CPU loops run on torch's intra-op threads: the library is built with OpenMP (at::parallel_for is a header
template, so its `#pragma omp parallel` is compiled into pydc._C; built without -fopenmp, every pydc loop ran on
one thread whatever torch.set_num_threads said), shares torch's one OpenMP runtime, and computes the same at any
thread count."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pydc.cluster import kmeans
from pydc.ops.cpu_capability import cpu_parallel_threads
from pydc.ops.cpu_gemm import ensure_cpu_gemm

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_pydc_loops_run_on_as_many_threads_as_torch_is_set_to(count):
    with torch_threads(count):
        assert cpu_parallel_threads() == count


def test_pydc_uses_the_openmp_runtime_torch_loaded():
    """pydc._C records libgomp.so.1 and must get torch's copy: a second runtime would keep its own thread pool,
    deaf to torch.set_num_threads. In a fresh process (other packages, scikit-learn's wheel among them, bring
    their own renamed copies)."""
    script = textwrap.dedent("""
        import torch
        import pydc
        torch.set_num_threads(2)
        assert torch.ops.pydc.cpu_parallel_threads() == 2
        print("\\n".join(sorted({line.split()[-1] for line in open("/proc/self/maps")
                                  if "libgomp" in line or "libiomp" in line})))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    mapped = result.stdout.split()
    torch_lib = Path(torch.__file__).parent / "lib"
    assert len(mapped) == 1 and Path(mapped[0]).parent == torch_lib, mapped


def every_parallel_kernel() -> dict[str, torch.Tensor]:
    """Inputs large enough that each op's at::parallel_for splits them (bands, row chunks)."""
    generator = torch.Generator().manual_seed(3)
    out = {}
    images = torch.randint(0, 256, (6, 3, 70, 45), dtype=torch.uint8, generator=generator)
    out["sobel"] = torch.ops.pydc.sobel_normalize(images, MEAN, STD, None)
    out["sobel_nhwc"] = torch.ops.pydc.sobel_normalize(images.contiguous(memory_format=torch.channels_last),
                                                       MEAN, STD, None)
    out["sobel_f64"] = torch.ops.pydc.sobel_normalize(images.double() / 255, MEAN, STD, torch.float64)
    centres = torch.randn(40, 24, generator=generator) * 4
    points = centres[torch.randint(0, 40, (12000,), generator=generator)] + torch.randn(12000, 24,
                                                                                        generator=generator)
    labels, distances = torch.ops.pydc.kmeans_assign(points, centres, None, True)
    sums, counts = torch.ops.pydc.kmeans_update(points, labels, 40, True)
    out.update(assign_labels=labels, assign_distances=distances, update_sums=sums, update_counts=counts)
    result = kmeans(points, 40, niter=6, seed=0, backend="torch")
    out.update(kmeans_labels=result.labels, kmeans_centroids=result.centroids)
    shift = points.mean(0).double()
    total, gram, bad = torch.zeros(24, dtype=torch.float64), torch.zeros(24, 24), torch.zeros(1, dtype=torch.int64)
    torch.ops.pydc.pca_accumulate(points, shift, total, gram, bad)
    projection = torch.randn(8, 24, generator=generator)
    y, _ = torch.ops.pydc.pca_transform(points, shift, projection, 1e-10)
    out.update(pca_total=total, pca_gram=gram.triu(), pca_y=y)
    return out


def test_every_parallel_kernel_computes_the_same_on_one_and_two_threads():
    ensure_cpu_gemm()  # the k-means GEMM's BLAS, chosen once per process: the same for both runs
    with torch_threads(1):
        serial = every_parallel_kernel()
    with torch_threads(2):
        assert cpu_parallel_threads() == 2
        parallel = every_parallel_kernel()
    for name, value in serial.items():
        if name.startswith(("pca_total", "pca_gram", "update_sums", "assign_distances")):
            # reductions whose order may follow the split, and float32 distances from the BLAS GEMM (whose
            # blocking may follow its thread count); the labels, settled in float64, may not move
            torch.testing.assert_close(parallel[name], value, rtol=1e-5, atol=1e-3, msg=name)
        else:
            assert torch.equal(parallel[name], value), f"{name} differs between 1 and 2 threads"
