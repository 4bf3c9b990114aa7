"""Launch configurations of the Triton dequant-matmul kernels, chosen per shape class.

Plain Python (no triton import), so tools and tests can read the table without building the
kernels. `pick_config` is the heuristic every launch uses unless autotuning is on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .reference import Problem

__all__ = ["CONFIGS", "GEMV_MAX_M", "KernelConfig", "fit_block_k", "pick_config", "split_plan"]

GEMV_MAX_M = 16  # decode batch sizes up to this take the split-K kernel


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration. `split_k` only applies to the GEMV kernel."""

    kind: str  # "gemm" or "gemv"
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    group_m: int = 8


# The launch configurations `pick_config` chooses from, by shape class (BLOCK_K is then fitted to
# the group size; the GEMV's split_k is planned per call). tools/compile_check.py compiles these.
CONFIGS = {
    "gemv": KernelConfig("gemv", 16, 64, 64, num_warps=4, num_stages=3),
    "gemm-M32": KernelConfig("gemm", 32, 64, 64, num_warps=4, num_stages=3),
    "gemm-M64": KernelConfig("gemm", 64, 64, 64, num_warps=4, num_stages=3),
    # BLOCK_K 32 keeps a stage (x 8 KiB + int32 codes 16 KiB) small enough for 3 stages on sm_80.
    "gemm-M128+": KernelConfig("gemm", 128, 128, 32, num_warps=8, num_stages=3),
}


def fit_block_k(block_k: int, group_size: int, act_order: bool) -> int:
    # A K tile must sit inside one group (fast path) and divide K; K and G are multiples of 32.
    if act_order or group_size % block_k:
        return 32
    return block_k


def pick_config(
    p: Problem, act_order: bool, kind: str | None = None, sm_count: int = 132, bits: int = 4
) -> KernelConfig:
    """Block sizes per shape class: decode (M <= 16), small prefill (M <= 64), large prefill.

    Heuristic: sized so registers and shared memory fit sm_80/sm_90 without loop spills (see
    benchmarks/results/kernels_compile.md); not yet timed on a GPU.
    """
    kind = kind or ("gemv" if p.M <= GEMV_MAX_M else "gemm")
    if kind == "gemv":
        if p.M > GEMV_MAX_M:
            raise ValueError(
                f"M={p.M} is too large for the GEMV kernel (M <= {GEMV_MAX_M}): use kind='gemm'"
            )
        base = CONFIGS["gemv"]
        bk = fit_block_k(base.block_k, p.group_size, act_order)
        # Enough programs to cover the SMs about twice, each split keeping >= 4 K tiles, and the
        # fp32 workspace traffic (write + read, 8·split·M·N bytes) within 1/8 of the weight bytes
        # (K·N·bits/8): split <= K·bits / (512·M).
        n_tiles = _cdiv(p.N, base.block_n)
        k_tiles = p.K // bk
        budget = p.K * bits // (512 * max(p.M, 1))
        split = max(1, min(_cdiv(2 * sm_count, n_tiles), k_tiles // 4, budget, 16))
        return replace(base, block_k=bk, split_k=split)
    if kind != "gemm":
        raise ValueError(f"kind={kind!r} is not a kernel: use 'gemm' or 'gemv'")
    if p.M <= 64:
        base = CONFIGS["gemm-M32" if p.M <= 32 else "gemm-M64"]
        return replace(base, block_k=fit_block_k(base.block_k, p.group_size, act_order))
    return CONFIGS["gemm-M128+"]


def split_plan(K: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(K elements per split, number of splits) with every split a whole number of K tiles and
    none empty."""
    k_tiles = K // block_k
    tiles_per_split = _cdiv(k_tiles, max(1, min(split_k, k_tiles)))
    return tiles_per_split * block_k, _cdiv(k_tiles, tiles_per_split)
