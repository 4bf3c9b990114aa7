"""Give the pages of a triangular factor's zero triangle back to the operating system.

GPTQ's factorizations run in one float64 K×K buffer (`gptq.HessianFactor`): 1.6 GiB at
K = 14336, Llama-3-8B's down_proj. After a Cholesky factorization half of it is the zero
triangle that torch writes beside the factor, which nothing reads for its values. On Linux,
madvise(MADV_DONTNEED) on whole pages of private anonymous memory, which is what torch's CPU
allocator hands out for buffers this size, frees them at once, and a later access reads zeros
(fresh zero-filled pages): the tensor keeps its values exactly, so this changes memory, never
results. Elsewhere (another OS, a GPU tensor, a small or non-column-major buffer) it does
nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable

import torch

__all__ = ["release_zero_triangle"]

_MADV_DONTNEED = 4  # Linux: the pages read back as zeros
_MIN_BYTES = 1 << 26  # below this the syscalls cost more than the memory is worth


def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def release_zero_triangle(A: torch.Tensor, *, upper: bool, min_bytes: int | None = None) -> int:
    """Release the whole pages of A's strictly upper (`upper`) or strictly lower triangle, which
    the caller guarantees to be zero, and return how many bytes that was (0 when nothing is
    released).

    A is a column-major [K, K] CPU tensor (strides (1, K)), as the factorizations leave it, in
    memory torch allocated (not a tensor over a mapped file, whose pages would read back as the
    file's):
    column j is one contiguous run of K elements, whose first j (upper) or last K − j − 1
    (lower) entries are the triangle's. Buffers under `min_bytes` (default 64 MiB) are left
    alone.
    """
    K = A.shape[0]
    if (
        _MADVISE is None
        or A.device.type != "cpu"
        or A.ndim != 2
        or A.shape[1] != K
        or A.stride() != (1, K)
        or A.numel() * A.element_size() < (_MIN_BYTES if min_bytes is None else min_bytes)
    ):
        return 0
    size, page = A.element_size(), mmap.PAGESIZE
    base = A.data_ptr()
    released = 0
    for j in range(K):
        first, last = (0, j) if upper else (j + 1, K)  # the triangle's rows in column j
        lo = base + (j * K + first) * size
        hi = base + (j * K + last) * size
        lo = -(-lo // page) * page  # whole pages inside the run only
        hi = hi // page * page
        if hi > lo:
            if _MADVISE(lo, hi - lo, _MADV_DONTNEED) != 0:
                return released  # refused (e.g. not anonymous memory): keep the pages
            released += hi - lo
    return released
