"""The `@triton.jit` kernels of the GPTQ dequant-matmul; `triton_kernels` launches them.

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
so DOT_F32 upcasts the dot operands (after rounding W to bf16, as the GPU would). Triton reads
TRITON_INTERPRET when `@triton.jit` runs, i.e. when this module is first imported.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The kernels are private: callers launch them through `triton_kernels.launch`; the tools that
# compile them ahead of time (tools/compile_check.py) take them from here.
__all__: list[str] = []

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
