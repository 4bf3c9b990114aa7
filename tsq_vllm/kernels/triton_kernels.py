"""Triton dequant-matmul for GPTQ weights at 2, 3, 4 and 8 bits: y = x · W, W decoded on the fly.

With b bits, group size G and the checkpoint tensors as stored (see `tsq_vllm.format.gptq`):

  code[k, n] = bits [s, s + b) of the bit stream qweight[:, n], s = k·b   (low bits first)
  z[g, n]    = bits [n·b, n·b + b) of the bit stream qzeros[g, :] + ZERO_OFFSET   (1 for v1)
  W[k, n]    = scales[g(k), n] · (code[k, n] − z[g(k), n]),   g(k) = g_idx[k] or k // G
  y[m, n]    = Σ_k x[m, k] · W[k, n]                          (fp32 accumulation)

Word w of a stream holds stream bits [32w, 32w + 32). Bit position s lives in word s // 32 at
shift s % 32; for b = 3 the fields at shift 30 and 31 (values 10 and 21 of each 32-value run)
straddle into the next word, so the decode is `(lo >> shift | hi << (32 - shift)) & mask` on
unsigned words: an arithmetic shift would smear the sign bit of `lo` into the field.

Two kernels share the decode:
- `_gemm_kernel` (prefill): tiles [BLOCK_M, BLOCK_N] of y, loop over K in BLOCK_K steps, W tile
  decoded and scaled in registers, then `tl.dot` into an fp32 accumulator.
- `_gemv_kernel` (decode, M <= 16): a skinny GEMM with BLOCK_M = 16 (the smallest tl.dot M) whose
  K range is split over SPLIT_K programs so that a small N still fills the GPU; partial sums go to
  an fp32 workspace [SPLIT_K, M, N] that `_splitk_reduce_kernel` sums in a fixed order
  (deterministic, unlike atomics). Without act-order a K tile lies inside one group, so the integer
  tile (code − z) goes into the dot exactly and the group scale multiplies the [M, N] partial:
  fewer multiplies than scaling W when M is small, and no rounding of W.

Without act-order (g_idx None) BLOCK_K divides G, so a K tile has one group: scales and zeros are
one row per tile. With act-order every row of the tile gathers its own group.

Interpreter (TRITON_INTERPRET=1, CPU tensors): it computes a bf16 tl.dot on the raw bit patterns,
so DOT_F32 upcasts the dot operands (after rounding W to bf16, as the GPU would); and autotuning
needs a CPU timer there, so it is opt-in (TSQ_TRITON_AUTOTUNE=1) and off under the interpreter.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import replace
from typing import Any

import torch
import triton
import triton.language as tl

from ..format.gptq import GPTQLayer
from .configs import CONFIGS, GEMV_MAX_M, KernelConfig, fit_block_k, pick_config, split_plan
from .reference import check_input

__all__ = [
    "CONFIGS",
    "GEMV_MAX_M",
    "KernelConfig",
    "is_interpreted",
    "autotune_enabled",
    "pick_config",
    "launch",
    "dequant_matmul_triton",
]

# ----------------------------------------------------------------------------------------------
# Decode helpers


@triton.jit
def _unpack(ptrs, shift, next_word, mask, BITS: tl.constexpr):
    """The b-bit fields starting `shift` bits into the words at `ptrs` (next stream word is
    `next_word` elements further on)."""
    lo = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    v = lo >> shift.to(tl.uint32)
    if BITS == 3:
        # Only shifts 30 and 31 straddle; `& 31` keeps the unused shift in range where shift = 0.
        hi = tl.load(ptrs + next_word, mask=mask & (shift > 29), other=0).to(
            tl.uint32, bitcast=True
        )
        v = v | (hi << ((32 - shift) & 31).to(tl.uint32))
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _load_codes(qw_ptr, offs_k, offs_n, n_mask, stride_qk, stride_qn, BITS: tl.constexpr):
    """code[k, n] for a [BLOCK_K, BLOCK_N] tile, int32."""
    bit = offs_k * BITS
    ptrs = qw_ptr + (bit // 32)[:, None] * stride_qk + offs_n[None, :] * stride_qn
    return _unpack(ptrs, (bit % 32)[:, None], stride_qk, n_mask[None, :], BITS)


@triton.jit
def _load_zeros(
    qz_ptr, row_off, offs_n, n_mask, stride_zn, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr
):
    """z at group row offset `row_off` (a scalar, or [BLOCK_K, 1] with [1, BLOCK_N] offs_n)."""
    bit = offs_n * BITS
    ptrs = qz_ptr + row_off + (bit // 32) * stride_zn
    return _unpack(ptrs, bit % 32, stride_zn, n_mask, BITS) + ZERO_OFFSET


@triton.jit
def _act_order_weight(
    qz_ptr,
    s_ptr,
    g_ptr,
    q,
    offs_k,
    offs_n,
    n_mask,
    stride_zg,
    stride_zn,
    stride_sg,
    stride_sn,
    BITS: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,
):
    """W tile in fp32 when each row k has its own group g_idx[k]."""
    g = tl.load(g_ptr + offs_k)[:, None]
    s = tl.load(s_ptr + g * stride_sg + offs_n[None, :] * stride_sn, mask=n_mask[None, :], other=0)
    z = _load_zeros(
        qz_ptr, g * stride_zg, offs_n[None, :], n_mask[None, :], stride_zn, BITS, ZERO_OFFSET
    )
    return (q - z).to(tl.float32) * s.to(tl.float32)


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _gemm_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    y_ptr,
    M,
    N,
    K,
    M_BUCKET,  # M_BUCKET (next power of 2 of M) is only an autotuning key
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_zg,
    stride_zn,
    stride_sg,
    stride_sn,
    stride_ym,
    stride_yn,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,
    ACT_ORDER: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped launch order: GROUP_M row tiles walk the same W columns while those stay in L2.
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_rows
    pid_n = (pid % num_in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # the wrapper guarantees BLOCK_K divides K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None], other=0)
        q = _load_codes(qw_ptr, offs_k, offs_n, n_mask, stride_qk, stride_qn, BITS)
        if ACT_ORDER:
            w = _act_order_weight(
                qz_ptr,
                s_ptr,
                g_ptr,
                q,
                offs_k,
                offs_n,
                n_mask,
                stride_zg,
                stride_zn,
                stride_sg,
                stride_sn,
                BITS,
                ZERO_OFFSET,
            )
        else:
            g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask, other=0)
            z = _load_zeros(qz_ptr, g * stride_zg, offs_n, n_mask, stride_zn, BITS, ZERO_OFFSET)
            w = (q - z[None, :]).to(tl.float32) * s.to(tl.float32)[None, :]
        # Scaling W (not the [M, N] partial) is cheaper here: BLOCK_M >= BLOCK_K.
        w = w.to(x_ptr.dtype.element_ty)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(a, w, acc)

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gemv_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,
    K_PER_SPLIT,
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_zg,
    stride_zn,
    stride_sg,
    stride_sn,
    stride_os,
    stride_om,
    stride_on,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,
    ACT_ORDER: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_s * K_PER_SPLIT  # K_PER_SPLIT is a multiple of BLOCK_K
    k_hi = min(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None], other=0)
        if DOT_F32:
            a = a.to(tl.float32)
        q = _load_codes(qw_ptr, offs_k, offs_n, n_mask, stride_qk, stride_qn, BITS)
        if ACT_ORDER:
            w = _act_order_weight(
                qz_ptr,
                s_ptr,
                g_ptr,
                q,
                offs_k,
                offs_n,
                n_mask,
                stride_zg,
                stride_zn,
                stride_sg,
                stride_sn,
                BITS,
                ZERO_OFFSET,
            )
            acc = tl.dot(a, w.to(x_ptr.dtype.element_ty).to(a.dtype), acc)
        else:
            g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask, other=0)
            z = _load_zeros(qz_ptr, g * stride_zg, offs_n, n_mask, stride_zn, BITS, ZERO_OFFSET)
            # code - z lies in [-256, 255]: exact in fp16 and bf16, so the dot rounds nothing.
            part = tl.dot(a, (q - z[None, :]).to(a.dtype))
            acc += part * s.to(tl.float32)[None, :]

    out_ptrs = (
        out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _splitk_reduce_kernel(ws_ptr, y_ptr, M, N, SPLIT_K, stride_ym, stride_yn, BLOCK: tl.constexpr):
    """y[m, n] = Σ_s ws[s, m, n] over a contiguous fp32 workspace, summed in split order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0)
    m = offs // N
    n = offs % N
    tl.store(y_ptr + m * stride_ym + n * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Configurations


def is_interpreted() -> bool:
    """True when this module's kernels were built by the Triton interpreter (TRITON_INTERPRET=1
    when the module was imported), so they run on CPU tensors."""
    return not isinstance(_gemm_kernel, triton.runtime.JITFunction)


def autotune_enabled() -> bool:
    """Autotuning is opt-in (TSQ_TRITON_AUTOTUNE=1) and never used by the interpreter."""
    return os.environ.get("TSQ_TRITON_AUTOTUNE", "0") == "1" and not is_interpreted()


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Autotuning candidates (GPU only). BLOCK_K candidates that do not fit G or K are pruned per call.
_GEMM_TUNE = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (32, 64, 64, 4, 3),
    (64, 64, 64, 4, 3),
    (64, 128, 32, 4, 3),
    (128, 64, 32, 4, 3),
    (128, 128, 32, 8, 3),
    (128, 128, 64, 8, 2),
    (128, 256, 32, 8, 3),
    (256, 128, 32, 8, 3),
]
_GEMV_TUNE = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
    (32, 32, 4, 3),
    (64, 32, 4, 3),
    (64, 64, 4, 3),
    (128, 32, 4, 3),
    (128, 64, 8, 3),
    (256, 32, 8, 2),
]


def _prune(configs, named_args, **kwargs):
    G, act = kwargs["GROUP_SIZE"], kwargs["ACT_ORDER"]
    k_step = named_args.get("K_PER_SPLIT", named_args["K"])  # every split must be whole K tiles
    keep = [
        c
        for c in configs
        if named_args["K"] % c.kwargs["BLOCK_K"] == 0
        and k_step % c.kwargs["BLOCK_K"] == 0
        and (act or G % c.kwargs["BLOCK_K"] == 0)
    ]
    return keep or [c for c in configs if c.kwargs["BLOCK_K"] == 32][:1]


def _cpu_bench(fn, quantiles=None):
    """Wall-clock timer for autotuning under the interpreter (tests only)."""
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


@functools.cache
def _tuned(kind: str):
    bench = _cpu_bench if is_interpreted() else None
    prune = {"early_config_prune": _prune}
    if kind == "gemm":
        configs = [
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                num_warps=w,
                num_stages=s,
            )
            for bm, bn, bk, w, s in _GEMM_TUNE
        ]
        return triton.autotune(
            configs, key=["M_BUCKET", "N", "K"], prune_configs_by=prune, do_bench=bench
        )(_gemm_kernel)
    configs = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in _GEMV_TUNE
    ]
    return triton.autotune(
        configs, key=["M_BUCKET", "N", "K", "K_PER_SPLIT"], prune_configs_by=prune, do_bench=bench
    )(_gemv_kernel)


# ----------------------------------------------------------------------------------------------
# Launch


def launch(
    x: torch.Tensor,
    layer: GPTQLayer,
    *,
    config: KernelConfig | None = None,
    kind: str | None = None,
    autotune: bool | None = None,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Validate, pick a configuration and run one kernel on x [M, K]. Returns y [M, N] (`out` if given).

    `config` fixes the launch (tests use it to force a path); otherwise `pick_config` chooses, or
    the autotuner when `autotune` (default: `autotune_enabled()`). `workspace` is the fp32
    [split_k, M, N] buffer of the GEMV (allocated when None).
    """
    p = check_input(x, layer)
    qweight, qzeros, scales, g_idx, bits = (
        layer.qweight,
        layer.qzeros,
        layer.scales,
        layer.g_idx,
        layer.bits,
    )
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"x has dtype {x.dtype}: the Triton kernels take float16 or bfloat16 activations; cast x"
        )
    if x.device.type == "cpu" and not is_interpreted():
        raise RuntimeError(
            "the Triton kernels got CPU tensors but were not built by the interpreter: set "
            "TRITON_INTERPRET=1 before tsq_vllm.kernels.triton_kernels is first imported, or use backend='torch'"
        )
    if out is None:
        out = torch.empty(p.M, p.N, device=x.device, dtype=x.dtype)
    elif out.shape != (p.M, p.N) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out is {out.dtype} {tuple(out.shape)} on {out.device}: expected {x.dtype} [{p.M}, {p.N}]"
        )
    if p.M == 0 or p.N == 0:
        return out
    act_order = g_idx is not None
    if autotune is None:
        autotune = autotune_enabled() and config is None
    if config is None:
        sms = _sm_count(x.device.index or 0) if x.is_cuda else 8
        config = pick_config(p, act_order, kind, sm_count=sms, bits=bits)
    elif kind is not None and config.kind != kind:
        raise ValueError(f"config is for {config.kind!r} but kind={kind!r}")
    config = replace(config, block_k=fit_block_k(config.block_k, p.group_size, act_order))
    if p.K % config.block_k:
        raise ValueError(f"block_k={config.block_k} does not divide K={p.K}: use 32")

    # The act-order pointer must be a tensor even when unused; qweight stands in.
    g_arg = g_idx if act_order else qweight
    common = dict(
        BITS=bits,
        GROUP_SIZE=p.group_size,
        ZERO_OFFSET=layer.zero_offset,
        ACT_ORDER=act_order,
        DOT_F32=is_interpreted() and x.dtype == torch.bfloat16,
    )
    m_bucket = triton.next_power_of_2(max(p.M, 1))
    strides = (
        x.stride(0),
        x.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        qzeros.stride(0),
        qzeros.stride(1),
        scales.stride(0),
        scales.stride(1),
    )

    grid: Any  # a launch grid, or a callable of the autotuned meta-parameters
    args: tuple[Any, ...]
    if config.kind == "gemm":
        args = (
            x,
            qweight,
            qzeros,
            scales,
            g_arg,
            out,
            p.M,
            p.N,
            p.K,
            m_bucket,
            *strides,
            out.stride(0),
            out.stride(1),
        )
        if autotune:

            def tuned_grid(meta: dict[str, Any]) -> tuple[int]:
                return (triton.cdiv(p.M, meta["BLOCK_M"]) * triton.cdiv(p.N, meta["BLOCK_N"]),)

            _tuned("gemm")[tuned_grid](*args, **common)
        else:
            grid = (triton.cdiv(p.M, config.block_m) * triton.cdiv(p.N, config.block_n),)
            _gemm_kernel[grid](
                *args,
                **common,
                BLOCK_M=config.block_m,
                BLOCK_N=config.block_n,
                BLOCK_K=config.block_k,
                GROUP_M=config.group_m,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )
        return out

    if p.M > GEMV_MAX_M:
        raise ValueError(
            f"M={p.M} is too large for the GEMV kernel (M <= {GEMV_MAX_M}): use kind='gemm'"
        )
    # Splits are planned in units of 64 (any tuned BLOCK_K divides it) when autotuning.
    unit = (
        64
        if autotune and p.K % 64 == 0 and (act_order or p.group_size % 64 == 0)
        else config.block_k
    )
    k_per_split, split = split_plan(p.K, unit, config.split_k)
    t_strides: tuple[int, ...]
    if split == 1:
        target, t_strides = out, (0, out.stride(0), out.stride(1))
    else:
        if workspace is None:
            workspace = torch.empty(split, p.M, p.N, device=x.device, dtype=torch.float32)
        elif (
            workspace.shape != (split, p.M, p.N)
            or workspace.dtype != torch.float32
            or not workspace.is_contiguous()
        ):
            raise ValueError(
                f"workspace is {workspace.dtype} {tuple(workspace.shape)}: expected contiguous "
                f"float32 [{split}, {p.M}, {p.N}]"
            )
        target, t_strides = workspace, workspace.stride()
    args = (
        x,
        qweight,
        qzeros,
        scales,
        g_arg,
        target,
        p.M,
        p.N,
        p.K,
        m_bucket,
        k_per_split,
        *strides,
        *t_strides,
    )
    if autotune:
        grid = lambda meta: (triton.cdiv(p.N, meta["BLOCK_N"]), split)  # noqa: E731
        _tuned("gemv")[grid](*args, **common)
    else:
        grid = (triton.cdiv(p.N, config.block_n), split)
        _gemv_kernel[grid](
            *args,
            **common,
            BLOCK_M=16,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(p.M * p.N, block),)](
            workspace, out, p.M, p.N, split, out.stride(0), out.stride(1), BLOCK=block
        )
    return out


def dequant_matmul_triton(
    x: torch.Tensor, layer: GPTQLayer, *, kind: str | None = None
) -> torch.Tensor:
    """y [..., N] = x [..., K] · W on the Triton kernels (CUDA, or CPU under the interpreter)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[1] and x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = launch(x2, layer, kind=kind)
    return y.reshape(*lead, y.shape[-1])
