"""Large CPU buffers backed by transparent huge pages where the kernel allows it.

The bounded k-means assigners keep an N x k float32 state (400 MB at 100k points, k = 1000) that is written
for the first time by their first pass. With 4 KiB pages that first write takes ~100k page faults (0.1-0.2 s
on a 2-core KVM guest, a quarter to a half of the pass); with 2 MiB pages it takes 200. Linux's default
transparent-huge-page mode is often `madvise` (only advised ranges get them), and torch's allocator advises
nothing unless THP_MEM_ALLOC_ENABLE=1 was set before torch started, so these buffers ask for it themselves.
"""

from __future__ import annotations

import ctypes
import sys

import torch

HUGE_PAGE = 2 << 20  # bytes (x86-64, arm64 with 4 KiB base pages)
_MADV_HUGEPAGE = 14   # <sys/mman.h> on Linux
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Advises the kernel to back the whole 2 MiB pages inside a contiguous CPU tensor's memory with huge
    pages (MADV_HUGEPAGE) before it is first written. Returns whether the advice was given and accepted: False off
    Linux, for tensors smaller than one huge page, and where the kernel refuses it (built without THP).
    Advice only: the contents and their meaning do not change."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
    if last <= first:
        return False
    return _madvise()(first, last - first, _MADV_HUGEPAGE) == 0


def empty_huge(*size: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(size, dtype=dtype) on the CPU, advised to huge pages where the kernel allows
    (advise_huge_pages)."""
    tensor = torch.empty(size, dtype=dtype)
    advise_huge_pages(tensor)
    return tensor
