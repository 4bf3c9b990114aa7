"""glibc's heap, kept from growing with depth: freed per-layer tensors go back to the OS.

By default glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB),
so from the first decoder layer on, per-layer tensors of a few MiB come from the heap, and the
holes they leave when freed stay resident: peak RSS grew with every layer (measured in
benchmarks/results/bench_memory.md). `return_freed_memory` (the CLI calls it once, before any
work) fixes the threshold, which also stops that adjustment; `trim` (after each decoder layer)
hands the free pages left inside the heap back. Other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

__all__ = ["MMAP_THRESHOLD", "return_freed_memory", "trim"]

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
MMAP_THRESHOLD = 4 * 2**20  # blocks this big or bigger are mapped, and unmapped when freed


@functools.cache  # looked up once: `trim` runs after every decoder layer
def _glibc(name: str) -> Any:
    if os.uname().sysname != "Linux":
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD; True if it was set. A
    MALLOC_MMAP_THRESHOLD_ the user set is left as it is."""
    mallopt = None if "MALLOC_MMAP_THRESHOLD_" in os.environ else _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim() -> bool:
    """Give the free pages inside glibc's heap back to the OS (`malloc_trim(0)`); True if any."""
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(malloc_trim(0))
