"""The `@triton.jit` BCQ dequant-matmul kernel; `bcq_triton` launches it.

With k bit-planes, group size G and the checkpoint tensors as stored (`tsq_vllm.format.bcq`):

  b_i[k, n] = 2 · (bit (k mod 32) of bcq_bits[i, k // 32, n]) − 1        (LSB first)
  W[k, n]   = Σ_i bcq_alpha[i, g(k), n] · b_i[k, n] + bcq_offset[g(k), n]
  y[m, n]   = Σ_k x[m, k] · W[k, n]                                        (fp32 accumulation)

with g(k) = g_idx[k] (act-order) or k // G.

One kernel for every M: tiles [BLOCK_M, BLOCK_N] of y, a loop over K in BLOCK_K steps (BLOCK_K a
multiple of 32, so a tile reads whole plane words), the W tile decoded in fp32 in the spec's
order (planes 0..k−1, offset last), rounded once to the activation dtype and fed to `tl.dot`.
Without act-order BLOCK_K divides G, so a tile has one group and its coefficients are one row
per plane; with act-order every row gathers its own group.

Interpreter (TRITON_INTERPRET=1): as in `triton_jit`, DOT_F32 upcasts the dot operands for bf16
(after rounding W to bf16, as the GPU would).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__: list[str] = []


@triton.jit
def _bcq_kernel(
    x_ptr,
    b_ptr,
    a_ptr,
    o_ptr,
    g_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_bi,
    stride_bw,
    stride_bn,
    stride_ai,
    stride_ag,
    stride_an,
    stride_og,
    stride_on,
    stride_ym,
    stride_yn,
    PLANES: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    ACT_ORDER: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # the wrapper guarantees BLOCK_K divides K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None], other=0)
        word = (offs_k // 32)[:, None] * stride_bw + offs_n[None, :] * stride_bn
        shift = (offs_k % 32).to(tl.uint32)[:, None]
        if ACT_ORDER:
            g = tl.load(g_ptr + offs_k)[:, None]  # [BLOCK_K, 1]
            o_ptrs = o_ptr + g * stride_og + offs_n[None, :] * stride_on
            w = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            for i in tl.static_range(PLANES):
                bits = tl.load(b_ptr + i * stride_bi + word, mask=n_mask[None, :], other=0)
                sign = ((bits.to(tl.uint32, bitcast=True) >> shift) & 1).to(tl.float32) * 2 - 1
                al = tl.load(
                    a_ptr + i * stride_ai + g * stride_ag + offs_n[None, :] * stride_an,
                    mask=n_mask[None, :],
                    other=0,
                )
                w += al.to(tl.float32) * sign
            w += tl.load(o_ptrs, mask=n_mask[None, :], other=0).to(tl.float32)
        else:
            g0 = k0 // GROUP_SIZE
            w = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            for i in tl.static_range(PLANES):
                bits = tl.load(b_ptr + i * stride_bi + word, mask=n_mask[None, :], other=0)
                sign = ((bits.to(tl.uint32, bitcast=True) >> shift) & 1).to(tl.float32) * 2 - 1
                al = tl.load(
                    a_ptr + i * stride_ai + g0 * stride_ag + offs_n * stride_an,
                    mask=n_mask,
                    other=0,
                )
                w += al.to(tl.float32)[None, :] * sign
            o = tl.load(o_ptr + g0 * stride_og + offs_n * stride_on, mask=n_mask, other=0)
            w += o.to(tl.float32)[None, :]
        w = w.to(x_ptr.dtype.element_ty)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(a, w, acc)

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
