"""Launching the Triton BCQ dequant-matmul (`bcq_jit`): validation and configuration.

`launch_bcq` runs the kernel on x [M, K] for a `BCQTensors` layer with a configuration from
`pick_bcq_config` (the tile classes of `BCQ_CONFIGS`, by M), or the one given. Under the
interpreter (TRITON_INTERPRET=1 when `bcq_jit` was first imported) it runs on CPU tensors.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton

from ..format.bcq import BCQTensors
from .bcq_jit import _bcq_kernel
from .configs import KernelConfig, fit_block_k

__all__ = [
    "BCQ_CONFIGS",
    "bcq_matmul_triton",
    "is_interpreted",
    "launch_bcq",
    "launch_bcq_tensors",
    "pick_bcq_config",
]

# By M: decode (M <= 16), small prefill, large prefill. tools/compile_check.py compiles these.
BCQ_CONFIGS = {
    "bcq-M16": KernelConfig("gemm", 16, 64, 64, num_warps=4, num_stages=3),
    "bcq-M64": KernelConfig("gemm", 64, 64, 64, num_warps=4, num_stages=3),
    "bcq-M128+": KernelConfig("gemm", 128, 128, 32, num_warps=8, num_stages=3),
}


def is_interpreted() -> bool:
    """True when the kernel was built by the Triton interpreter (runs on CPU tensors)."""
    return not isinstance(_bcq_kernel, triton.runtime.JITFunction)


def pick_bcq_config(M: int, group_size: int, act_order: bool) -> KernelConfig:
    """The tile class for M rows, BLOCK_K fitted to the group size (one group per K tile)."""
    label = "bcq-M16" if M <= 16 else "bcq-M64" if M <= 64 else "bcq-M128+"
    c = BCQ_CONFIGS[label]
    return replace(c, block_k=fit_block_k(c.block_k, group_size, act_order))


def launch_bcq(
    x: torch.Tensor,
    layer: BCQTensors,
    *,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] · W for fp16/bf16 x on the layer's device (`out` if given)."""
    return launch_bcq_tensors(
        x, layer.bcq_bits, layer.bcq_alpha, layer.bcq_offset, layer.g_idx, config=config, out=out
    )


def launch_bcq_tensors(
    x: torch.Tensor,
    bcq_bits: torch.Tensor,
    bcq_alpha: torch.Tensor,
    bcq_offset: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`launch_bcq` on the tensors of a layer already validated (`BCQTensors` reads values, which
    synchronizes on CUDA: the serving path builds it once, at load, and calls this per step)."""
    k, n_words, N = bcq_bits.shape
    K, n_g = n_words * 32, bcq_alpha.shape[1]
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected [M, K={K}]")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"x has dtype {x.dtype}: the Triton kernel takes float16 or bfloat16")
    if x.device != bcq_bits.device:
        raise ValueError(f"x is on {x.device} but the layer is on {bcq_bits.device}")
    if x.device.type == "cpu" and not is_interpreted():
        raise RuntimeError(
            "the Triton BCQ kernel got CPU tensors but was not built by the interpreter: set "
            "TRITON_INTERPRET=1 before tsq_vllm.kernels.bcq_jit is first imported"
        )
    M = x.shape[0]
    act_order = g_idx is not None
    G = K // n_g if not act_order else 32  # only read without act-order
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    if config is None:
        config = pick_bcq_config(M, G, act_order)
    config = replace(config, block_k=fit_block_k(config.block_k, G, act_order))
    if K % config.block_k:
        raise ValueError(f"block_k={config.block_k} does not divide K={K}: use 32")
    b, a, o = bcq_bits, bcq_alpha, bcq_offset
    grid = (triton.cdiv(M, config.block_m), triton.cdiv(N, config.block_n))
    _bcq_kernel[grid](
        x,
        b,
        a,
        o,
        g_idx if act_order else b,  # the pointer must be a tensor even when unused
        out,
        M,
        N,
        K,
        x.stride(0),
        x.stride(1),
        *b.stride(),
        *a.stride(),
        *o.stride(),
        out.stride(0),
        out.stride(1),
        PLANES=k,
        GROUP_SIZE=G,
        ACT_ORDER=act_order,
        DOT_F32=is_interpreted() and x.dtype == torch.bfloat16,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def bcq_matmul_triton(x: torch.Tensor, layer: BCQTensors) -> torch.Tensor:
    """y [..., N] = x [..., K] · W on the Triton kernel (CUDA, or CPU under the interpreter)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[1] and x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = launch_bcq(x2, layer)
    return y.reshape(*lead, y.shape[-1])
