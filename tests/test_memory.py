"""Huge-page advice for the bounded k-means state and the buffer kept between runs (pydc/utils/memory.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pydc.cluster.kmeans_bounded import pair_state_floats
from pydc.cluster.kmeans import initial_centroids, kmeans
from pydc.ops._registry import HAS_OPS
from pydc.utils.memory import (HUGE_PAGE, advise_huge_pages, empty_huge, keep, kept_bytes, kept_empty,
                               release_kept)


def thp_mode() -> str | None:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists():
        return None
    return path.read_text().split("[")[1].split("]")[0]


def test_empty_huge_is_an_ordinary_writable_tensor():
    tensor = empty_huge(3, HUGE_PAGE // 4, dtype=torch.float32)
    assert tensor.shape == (3, HUGE_PAGE // 4) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    tensor.fill_(2.5)
    assert float(tensor.sum()) == 2.5 * tensor.numel()


@pytest.mark.skipif(not sys.platform.startswith("linux") or thp_mode() in (None, "never"),
                    reason="needs Linux with transparent huge pages")
def test_the_kernel_accepts_the_advice():
    """Accepted for a buffer holding whole huge pages (a range not starting on a page boundary would be
    refused with EINVAL);
    nothing to advise below one huge page or for a non-contiguous view."""
    assert advise_huge_pages(torch.empty(3 * HUGE_PAGE // 4, dtype=torch.float32))
    assert advise_huge_pages(torch.empty(HUGE_PAGE // 4 + 1, dtype=torch.float64)[1:])  # odd start, 4 MiB
    assert not advise_huge_pages(torch.empty(1000, dtype=torch.float32))
    assert not advise_huge_pages(torch.empty(4, HUGE_PAGE // 4, dtype=torch.float32).t())


@pytest.fixture
def nothing_kept():
    release_kept()
    yield
    release_kept()


def test_a_kept_buffer_is_handed_out_once(nothing_kept, monkeypatch):
    monkeypatch.delenv("PYDC_KEEP_BUFFERS", raising=False)
    buffer = torch.empty(1000, dtype=torch.float32)
    keep(buffer)
    assert kept_bytes() == 4000
    taken = kept_empty(10, 90, dtype=torch.float32)  # 900 elements: at least as many, at most twice
    assert taken.shape == (10, 90) and taken.data_ptr() == buffer.data_ptr()
    assert kept_bytes() == 0
    again = kept_empty(10, 90, dtype=torch.float32)  # taken: never handed to a second holder
    assert again.data_ptr() != buffer.data_ptr()
    keep(buffer)
    assert kept_empty(2000, dtype=torch.float32).data_ptr() != buffer.data_ptr()  # too small
    assert kept_empty(400, dtype=torch.float32).data_ptr() != buffer.data_ptr()  # over twice the size
    assert kept_empty(1000, dtype=torch.float64).data_ptr() != buffer.data_ptr()  # another dtype
    assert kept_empty(1000, dtype=torch.float32).data_ptr() == buffer.data_ptr()


def test_keeping_is_switched_off_by_the_environment(nothing_kept, monkeypatch):
    keep(torch.empty(100))
    monkeypatch.setenv("PYDC_KEEP_BUFFERS", "0")
    keep(torch.empty(100))
    assert kept_bytes() == 0


@pytest.mark.skipif(not HAS_OPS, reason="needs the compiled pydc ops")
@pytest.mark.parametrize("bounds", ["elkan", "delta", "auto"])
def test_kmeans_keeps_its_state_and_a_dirty_one_changes_nothing(nothing_kept, monkeypatch, bounds):
    """A bounded run gives its N x k state back when it ends; the next run of that size takes it, whatever it
    holds (here NaN everywhere), and still gives plain Lloyd's labels."""
    monkeypatch.delenv("PYDC_KEEP_BUFFERS", raising=False)
    monkeypatch.setenv("PYDC_KMEANS_BOUNDS", bounds)
    n, d, k = 3000, 16, 40
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(5)), dim=1)
    init = initial_centroids(x, k, seed=0)
    first = kmeans(x, k, niter=12, backend="torch", init_centroids=init)
    state = pair_state_floats(n, k, d)  # the N x k state, and delta's packed points where pydc's GEMM runs
    assert kept_bytes() == state * 4, f"{bounds}: the run's state was not kept"
    dirty = kept_empty(state, dtype=torch.float32)
    dirty.fill_(float("nan"))  # products, bounds, packed points and their header alike
    keep(dirty)
    second = kmeans(x, k, niter=12, backend="torch", init_centroids=init)
    plain = kmeans(x, k, niter=12, backend="torch", init_centroids=init, bounded=False)
    assert torch.equal(second.labels, plain.labels) and torch.equal(first.labels, plain.labels)
    assert torch.equal(second.centroids, plain.centroids)
    assert kept_empty(state, dtype=torch.float32).data_ptr() == dirty.data_ptr()  # taken and given back
