"""Shared test set-up: device parametrization, seeding, and a hard failure when the ops are not built.

CUDA cases carry the `cuda` marker and are skipped where no GPU is visible; `pytest -m cuda` runs only them.
"""

from __future__ import annotations

import os

import pytest
import torch

import pydc

CUDA_AVAILABLE = torch.cuda.is_available()


def cpu_and_cuda():
    """Parameters for a `device` argument: cpu always, cuda marked (and skipped without a GPU)."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.cuda))


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not CUDA_AVAILABLE:
            item.add_marker(skip_cuda)


def pytest_sessionstart(session):
    # The tests exist to exercise the compiled kernels: running them against the Python fallback would pass
    # while testing nothing of the C++/CUDA code. PYDC_ALLOW_NO_OPS=1 opts out (pure-Python checks only).
    if not pydc.extension.has_ops() and os.environ.get("PYDC_ALLOW_NO_OPS") != "1":
        raise pytest.UsageError(f"pydc's compiled ops are not loaded: {pydc.extension.load_error()}")
    # PYDC_CPU_GEMM=torch|scipy runs the whole suite with that BLAS behind the CPU k-means GEMMs, including the
    # tests that call torch.ops.pydc.* directly (pydc's wrappers would choose only on their first call).
    if pydc.extension.has_ops() and os.environ.get("PYDC_CPU_GEMM"):
        from pydc.ops.cpu_gemm import use_cpu_gemm

        use_cpu_gemm()


@pytest.fixture
def restore_cpu_gemm():
    """The process's CPU GEMM choice (pydc.ops.cpu_gemm) back after a test that selects one."""
    from pydc.ops import cpu_gemm

    chosen, report = cpu_gemm._chosen, dict(cpu_gemm._report)
    yield
    cpu_gemm.use_cpu_gemm(chosen or "torch")
    cpu_gemm._chosen, cpu_gemm._report = chosen, report


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def random_images(shape, dtype, device="cpu", generator=None):
    """Random images in the value range of their dtype: uint8 in [0, 255], floating in [0, 1) (never zeros)."""
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).to(device)
    return torch.rand(shape, dtype=torch.float64, generator=generator).to(device=device, dtype=dtype)


def poison_cuda_allocator(nbytes: int = 64 << 20) -> None:
    """Fill and free a block of the CUDA caching allocator with NaN bytes, so that an output the next kernel
    allocates but does not fully write shows up as NaN instead of happening to hold zeros."""
    if CUDA_AVAILABLE:
        block = torch.full((nbytes // 4,), float("nan"), device="cuda")
        del block


@pytest.fixture
def poisoned(request):
    """Use in CUDA-parametrized tests: poisons the allocator before the test body runs."""
    poison_cuda_allocator()
