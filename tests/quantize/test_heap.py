"""glibc's heap policy (`quantize.heap`), observed through glibc's own counters and /proc."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

_GLIBC = hasattr(ctypes.CDLL(None), "mallinfo2")

# In a fresh interpreter: free one 6 MiB block, allocate another, and report whether glibc served
# it from mmap (returned to the OS when freed) or from its heap (stays resident when freed).
_PROBE = """
import ctypes, sys
from tsq_vllm.quantize.heap import return_freed_memory
if sys.argv[1] == "1":
    print("set", return_freed_memory())
class M(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks "
                                              "fsmblks uordblks fordblks keepcost").split()]
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = M
n = 6 * 2**20
libc.free(libc.malloc(n))  # glibc's default raises its mmap threshold to 6 MiB here
before = libc.mallinfo2().hblkhd
p = libc.malloc(n)
print("mmapped", libc.mallinfo2().hblkhd - before >= n)
libc.free(p)
"""


@pytest.mark.skipif(not _GLIBC, reason="glibc's malloc policy")
@pytest.mark.parametrize(
    "call,env,mmapped",
    [(True, {}, True), (False, {}, False), (True, {"MALLOC_MMAP_THRESHOLD_": "33554432"}, False)],
    ids=["set", "glibc-default", "user-setting-kept"],
)
def test_large_blocks_go_back_to_the_os_once_set(call, env, mmapped):
    res = _python(_PROBE, "1" if call else "0", env=env)
    lines = res.stdout.split("\n")
    assert f"mmapped {mmapped}" in lines
    if call:
        assert f"set {not env}" in lines


def _python(code, *args, env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    res = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**base, **env},
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res


# 128 MiB of small blocks in the heap, all freed but the last one, which keeps the heap's top (so
# glibc's automatic trimming cannot return the rest); RssAnon before and after `trim`.
_FRAGMENTED = """
import ctypes
from pathlib import Path
from tsq_vllm.quantize.heap import trim
def anon():
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(x for x in status if x.startswith("RssAnon")).split()[1]) // 1024
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 * 1024) for _ in range(2048)]
for b in blocks:
    ctypes.memset(b, 1, 64 * 1024)
for b in blocks[:-1]:
    libc.free(b)
before = anon()
print("trimmed", trim())
print("released", before - anon())
"""


@pytest.mark.skipif(not _GLIBC or not os.path.isfile("/proc/self/status"), reason="glibc, /proc")
def test_trim_returns_the_free_pages_inside_the_heap():
    lines = _python(_FRAGMENTED, env={}).stdout.split("\n")
    assert "trimmed True" in lines
    released = int(next(x for x in lines if x.startswith("released")).split()[1])
    assert released >= 100  # MiB of the 128 freed
