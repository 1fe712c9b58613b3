"""Large CPU buffers backed by transparent huge pages where the kernel allows it.

The bounded k-means assigners keep an N x k float32 state (400 MB at 100k points, k = 1000) that is written
for the first time by their first pass. With 4 KiB pages that first write takes ~100k page faults (0.1-0.2 s
on a 2-core KVM guest, a quarter to a half of the pass); with 2 MiB pages it takes 200. Linux's default
transparent-huge-page mode is often `madvise` (only advised ranges get them), and torch's allocator advises
nothing unless THP_MEM_ALLOC_ENABLE=1 was set before torch started, so these buffers ask for it themselves.

A process that clusters again (pydc.train clusters every epoch, with the same N and k) can skip even that: a
run gives its state back when it ends (keep) and the next one of the same size takes it (kept_empty) instead
of new memory. On a 2-core KVM guest (AMD EPYC Zen 4) the first write of 400 MB fresh from the kernel took
0.45-0.5 s whenever other work had run in between (the guest hands freed memory back to its host, which must
map it again), 0.3 s of a 3.5-4.3 s unstructured 100k x 256, k = 1000 run; written again in place it costs
nothing. One buffer is kept at a time, and only while PYDC_KEEP_BUFFERS is not "0" (read at each keep);
release_kept() frees it. Its contents never matter: every run writes its state before reading it.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading

import torch

HUGE_PAGE = 2 << 20  # bytes (x86-64, arm64 with 4 KiB base pages)
_MADV_HUGEPAGE = 14   # <sys/mman.h> on Linux
_libc = None
_kept: torch.Tensor | None = None  # the buffer keep() holds for the next kept_empty (module docstring)
_kept_lock = threading.Lock()


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


def keep(tensor: torch.Tensor | None) -> None:
    """Offers a contiguous CPU buffer whose contents are no longer needed to the next kept_empty of its dtype and
    at most its size (module docstring), in place of any buffer kept before; nothing when PYDC_KEEP_BUFFERS=0."""
    global _kept
    if tensor is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return
    if os.environ.get("PYDC_KEEP_BUFFERS", "1") == "0":
        release_kept()
        return
    with _kept_lock:
        _kept = tensor.detach().reshape(-1)


def kept_empty(*size: int, dtype: torch.dtype) -> torch.Tensor:
    """empty_huge(size, dtype=dtype), taken from the kept buffer when there is one of this dtype with at least
    as many elements and at most twice as many (then no longer kept: it belongs to the caller, who may keep it
    again when done); any contents."""
    global _kept
    numel = math.prod(size)
    with _kept_lock:
        kept = _kept
        if kept is not None and kept.dtype == dtype and numel <= kept.numel() <= 2 * numel:
            _kept = None
            return kept[:numel].view(size)
    return empty_huge(*size, dtype=dtype)


def release_kept() -> None:
    """Frees the kept buffer (if nobody else holds it)."""
    global _kept
    with _kept_lock:
        _kept = None


def kept_bytes() -> int:
    """Bytes of the buffer kept now (0: none)."""
    with _kept_lock:
        return 0 if _kept is None else _kept.numel() * _kept.element_size()
