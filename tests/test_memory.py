"""Huge-page advice for the bounded k-means state (pydc/utils/memory.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pydc.utils.memory import HUGE_PAGE, advise_huge_pages, empty_huge


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
