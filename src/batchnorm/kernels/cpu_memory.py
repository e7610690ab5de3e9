"""Memory for the CPU kernels' large outputs: kept after use and handed out again.

A fresh output of tens of MB costs whoever first writes it a page fault per page and the zeroing
of every page: ~3 ms per 32 MB here, about as long as a batch norm over it. glibc gives freed
blocks that large back to the OS, so every training step pays it again, for y in the forward and
dx in the backward. Like PyTorch's CUDA caching allocator, this module keeps the memory of our
freed outputs and reuses it: an output of at least _MIN_BYTES is a view of a pooled block, and
once that tensor and every view of it are gone, the block goes back to the free list of its
size. Measured on the training step of benchmarks/kernels.py: 32x64x56x56 NCHW 18.2 -> 13.6 ms,
16x64x32x32x8 30.0 -> 15.9 ms (torch.nn: 25.2 and 56.8 ms).

Free blocks are bounded (`max_free_bytes`, beyond which a freed block is released to the OS)
and `empty_cache()` releases them all. Blocks are 2 MB aligned and, where the OS has transparent
huge pages, backed by them: their first use then faults once per 2 MB, not per 4 KB (measured:
filling a fresh 32 MB tensor took 23 ms with 4 KB pages, 7 ms with huge pages, 4 ms once mapped).

The outputs are ordinary tensors with one difference: their storage is not resizable (it is a
numpy array's), so `y.resize_()` to a larger size raises.
"""

from __future__ import annotations

import collections
import ctypes
import os
import threading
import weakref

import numpy as np
import torch
from torch import Tensor

_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14
# Below this an output takes torch's allocator: malloc reuses such blocks itself.
_MIN_BYTES = 2 * _HUGE_PAGE
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _huge_pages_madvise():
    """libc's madvise when the kernel backs madvised memory with transparent huge pages (Linux
    with THP "always" or "madvise"), else None."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _huge_pages_madvise()


def _default_max_free_bytes() -> int:
    """An eighth of the physical memory, at most 2 GiB."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 << 30
    return min(2 << 30, physical // 8)


max_free_bytes = _default_max_free_bytes()
_free: dict[int, list[np.ndarray]] = collections.defaultdict(list)
_free_bytes = 0
_leases: dict[int, tuple[weakref.ref, np.ndarray]] = {}  # the blocks in use, by their weakref
# Reentrant: a garbage collection inside a locked section may run a finalizer (`_give_back`).
_lock = threading.RLock()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # a thread of the parent may have held it at the fork


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork to guard against
    os.register_at_fork(after_in_child=_after_fork_in_child)


def empty_like(x: Tensor) -> Tensor:
    """torch.empty_like(x) for a dense fp32/fp64 CPU tensor; from the pool when it takes at
    least _MIN_BYTES."""
    nbytes = x.numel() * x.element_size()
    dtype = _NUMPY_DTYPES.get(x.dtype)
    if nbytes < _MIN_BYTES or dtype is None:
        return torch.empty_like(x)
    block = _take(-(-nbytes // _HUGE_PAGE) * _HUGE_PAGE)
    values = block[:nbytes].view(dtype)
    # `values` lives as long as the tensor's storage (from_numpy holds it): its end is the
    # output's. A weakref callback, not weakref.finalize: 15 us against 37 us with cold caches.
    lease = weakref.ref(values, _end_of_lease)
    _leases[id(lease)] = (lease, block)
    return torch.from_numpy(values).as_strided(x.shape, x.stride())


def empty_cache() -> None:
    """Release every free block to the OS (outputs in use are not touched)."""
    global _free_bytes
    with _lock:
        _free.clear()
        _free_bytes = 0


def _take(size: int) -> np.ndarray:
    global _free_bytes
    with _lock:
        blocks = _free.get(size)
        if blocks:
            _free_bytes -= size
            return blocks.pop()
    return _new_block(size)


def _end_of_lease(lease: weakref.ref) -> None:
    _give_back(_leases.pop(id(lease))[1])


def _give_back(block: np.ndarray) -> None:
    global _free_bytes
    size = block.nbytes
    with _lock:
        if _free_bytes + size <= max_free_bytes:
            _free[size].append(block)
            _free_bytes += size


def _new_block(size: int) -> np.ndarray:
    """`size` bytes (a multiple of 2 MB) at a 2 MB boundary, advised to use huge pages."""
    raw = np.empty(size + _HUGE_PAGE, np.uint8)
    offset = -raw.ctypes.data % _HUGE_PAGE
    block = raw[offset:offset + size]  # a view: `raw` lives as long as `block`
    if _MADVISE is not None:
        _MADVISE(block.ctypes.data, size, _MADV_HUGEPAGE)
    return block
