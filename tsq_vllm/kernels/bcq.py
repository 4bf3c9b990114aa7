"""BCQ (GPTQT) linears: the torch reference, the CPU paths, and the `tsq::bcq_matmul` custom op.

`bcq_matmul_reference(x, layer)` is the specification: y = x · W with W = `dequantize_bcq` of
the layer (`tsq_vllm.format.bcq`), computed in fp32 and cast to x's dtype. The Triton kernel
(`bcq_jit`, launched from `bcq_triton`, imported only when used) is tested against it.

CPU paths (`prepare_cpu_bcq`), measured in benchmarks/results/cpu_bcq.md:

  "dense"   the reference decode once at load, then one dense matmul per call (exact in fp32).
  "planes"  a bit-plane GEMV: the k sign planes held as ±1 in the activation dtype, one batched
            matmul per group over all planes, then y = Σ_g Σ_i α_i[g] ⊙ (x_g · B_i[g]) +
            (Σ_{k∈g} x_k) o[g]. Equal to the spec up to the activation dtype's rounding.
  "int4"    the levels of every (group, channel) lie on a uniform grid (GPTQT's integer axis,
            b0 = 4): recover its step s and the integer codes u ∈ [0, 15] at load, then aten's
            CPU int4 matmul with w = (u − 8)·s + (o − Σ α_i + 8 s). Only for layers whose
            levels fit 16 codes; the step and the zero are rounded to bf16 like the GPTQ path.
  "native"  this package's AVX512-BF16 kernel (`kernels.cpu_native`), the default where it runs:
            the same integer codes as "int4" (step and lowest level in fp32) where the levels fit
            16 codes, else the k sign planes themselves as 0/1 bit planes, w = Σ 2α_i·β_i +
            (o − Σ α_i) (k bits a weight; b0 = 5 layers, which "int4" sends to "dense").

"int4" and "dense" layers are `kernels.cpu.CPUQuantizedLinear`s, the GPTQ path's own object, so a
BCQ checkpoint is served by the same call path as a GPTQ one; "planes" is `CPUBCQPlanes`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..format.bcq import BCQTensors, unpack_planes
from .cpu import (
    _INT4_N_ALIGN,
    CPUQuantizedLinear,
    _as_rows,
    _int4_plane,
    block_layout,
    int4_kernel_available,
    native_refusal,
)
from .cpu_native import native_unavailable_reason, pack_native, pack_native_planes

__all__ = [
    "BCQ_CPU_PATHS",
    "BCQ_OP_NAME",
    "CPUBCQPlanes",
    "bcq_integer_grid",
    "bcq_matmul",
    "bcq_matmul_op",
    "bcq_matmul_reference",
    "prepare_cpu_bcq",
    "register_bcq_op",
    "select_cpu_bcq_path",
]

BCQ_CPU_PATHS = ("dense", "planes", "int4", "native")
BCQ_OP_NAME = "tsq::bcq_matmul"
_INT4_LEVELS = 16


def bcq_matmul_reference(x: torch.Tensor, layer: BCQTensors) -> torch.Tensor:
    """y [..., N] = x [..., K] · W [K, N], W the reference decode, computed in fp32."""
    if x.shape[-1] != layer.K:
        raise ValueError(f"x has K={x.shape[-1]} input features but the layer takes K={layer.K}")
    w = layer.dequantize(torch.float32)
    return (x.reshape(-1, layer.K).float() @ w).to(x.dtype).reshape(*x.shape[:-1], layer.N)


def bcq_integer_grid(
    layer: BCQTensors, max_code: int = _INT4_LEVELS - 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The uniform grid under a layer's levels: codes u [K, N] in [0, max_code], step s [n_g, N]
    and lowest level [n_g, N] (float64) with W ≈ s[g] u + low[g]; None if some group has none.

    Per (group, channel) the levels are low + s Σ_i d_i β_i with integer d_i, 2 α_i = s d_i: the
    largest step d_1 is searched over 1 … max_code (the first fit is the coarsest grid), the
    others rounded, and a fit must reproduce every 2 α_i within 2⁻⁹ α_1 (fp16 rounding of α).
    """
    a2 = 2 * layer.bcq_alpha.double()  # [k, n_g, N]
    if (a2 < 0).any():
        return None
    top = a2.amax(0)  # [n_g, N]
    step = torch.ones_like(top)
    found = top == 0  # all levels equal: any step, every d_i = 0
    d = torch.zeros_like(a2)
    for t in range(1, max_code + 1):
        s = top / t
        dt = torch.where(s > 0, a2 / torch.where(s > 0, s, 1), 0).round()
        fits = ((dt * s - a2).abs() <= 2**-9 * top).all(0) & (dt.sum(0) <= max_code)
        new = fits & ~found
        step = torch.where(new, s, step)
        d = torch.where(new[None], dt, d)
        found |= fits
    if not bool(found.all()):
        return None
    g = layer.group_index()
    beta = (unpack_planes(layer.bcq_bits).long() + 1) // 2  # [k, K, N]
    codes = (d.long()[:, g] * beta).sum(0)  # [K, N]
    low = layer.bcq_offset.double() - layer.bcq_alpha.double().sum(0)
    return codes, step, low


def select_cpu_bcq_path(act_dtype: torch.dtype) -> str:
    """The default CPU path: by the measurements in benchmarks/results/cpu_bcq.md and, for
    "native" before "int4", benchmarks/results/cpu_linear.md (the same kernel choice as GPTQ's)."""
    if act_dtype != torch.bfloat16:
        return "dense"
    if native_unavailable_reason() is None:
        return "native"
    return "int4" if int4_kernel_available() else "dense"


@dataclass
class CPUBCQPlanes:
    """The "planes" path of one BCQ linear on CPU: y = x · W (+ bias), W never formed.

    planes [n_g, G, k·N] (±1 in the activation dtype), alpha [k, n_g, N] and offset [n_g, N] in
    fp32. The "int4" and "dense" paths are `kernels.cpu.CPUQuantizedLinear`s, the object the GPTQ
    path serves, so both checkpoint kinds share one call path.
    """

    in_features: int
    out_features: int
    act_dtype: torch.dtype
    planes: torch.Tensor
    alpha: torch.Tensor
    offset: torch.Tensor
    path: str = "planes"

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = _as_rows(x, self.in_features).to(self.act_dtype)
        n_g, G, kN = self.planes.shape
        N = self.out_features
        xg = x2.reshape(-1, n_g, G).transpose(0, 1)  # [n_g, M, G]
        part = torch.bmm(xg, self.planes).float()  # [n_g, M, k·N]
        part = part.reshape(n_g, -1, kN // N, N)  # [n_g, M, k, N]
        y = torch.einsum("gmin,ign->mn", part, self.alpha)
        y = y + xg.float().sum(-1).t() @ self.offset
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, N)


def prepare_cpu_bcq(
    layer: BCQTensors, *, act_dtype: torch.dtype = torch.bfloat16, path: str | None = None
) -> CPUQuantizedLinear | CPUBCQPlanes:
    """Convert one layer's BCQ tensors for CPU on `path` (default: `select_cpu_bcq_path`);
    "int4" and "native" fall back to "dense" where the grid or the kernel is missing."""
    if path is not None and path not in BCQ_CPU_PATHS:
        raise ValueError(f"path={path!r} is not a BCQ CPU path: use one of {BCQ_CPU_PATHS}")
    K, N, n_g = layer.K, layer.N, layer.n_groups
    G = K // n_g
    chosen = path or select_cpu_bcq_path(act_dtype)
    base: dict[str, Any] = dict(in_features=K, out_features=N, act_dtype=act_dtype)
    if chosen == "planes" and layer.g_idx is None:
        signs = unpack_planes(layer.bcq_bits).to(act_dtype)  # [k, K, N]
        planes = signs.reshape(layer.bits, n_g, G, N).permute(1, 2, 0, 3).reshape(n_g, G, -1)
        return CPUBCQPlanes(
            **base,
            planes=planes.contiguous(),
            alpha=layer.bcq_alpha.float().contiguous(),
            offset=layer.bcq_offset.float().contiguous(),
        )
    native = chosen == "native" and native_refusal(act_dtype, G) is None
    if native or (chosen == "int4" and act_dtype == torch.bfloat16 and int4_kernel_available()):
        grid = bcq_integer_grid(layer)
        layout = block_layout(layer.group_index(), G)
        if native and grid is None and layout is not None:
            return _native_planes(layer, base, *layout)
        if grid is not None and layout is not None:
            codes, step, low = grid
            perm, block_group = layout
            if perm is not None:
                codes = codes.index_select(0, perm)
            if native:
                s_b, low_b = step.index_select(0, block_group), low.index_select(0, block_group)
                return CPUQuantizedLinear(
                    "native",
                    **base,
                    group_size=G,
                    perm=perm,
                    native=pack_native(codes, s_b, low_b, G),
                )
            pad = -N % _INT4_N_ALIGN
            s = F.pad(step.index_select(0, block_group), (0, pad))  # [K/G, N_pad]
            z = F.pad((low + 8 * step).index_select(0, block_group), (0, pad))
            codes_nk = F.pad(codes.t(), (0, 0, 0, pad))
            tables = torch.stack([s, z], dim=-1).to(act_dtype).contiguous()
            return CPUQuantizedLinear(
                "int4",
                **base,
                group_size=G,
                perm=perm,
                planes=(_int4_plane(codes_nk),),
                scale_zeros=(tables,),
            )
    w = layer.dequantize(torch.float32)  # the reference decode, once
    return CPUQuantizedLinear(
        "dense", **base, group_size=G, weight=w.t().contiguous().to(act_dtype)
    )


def _native_planes(
    layer: BCQTensors,
    base: dict[str, Any],
    perm: torch.Tensor | None,
    block_group: torch.Tensor,
) -> CPUQuantizedLinear:
    """The "native" path for levels that fit no 16-code grid: the kernel reads the k planes
    themselves, w = Σ_i 2α_i·β_i + (offset − Σ α_i) with β_i = (sign_i + 1) / 2."""
    beta = (unpack_planes(layer.bcq_bits) > 0).to(torch.uint8)  # [k, K, N]
    if perm is not None:
        beta = beta.index_select(1, perm)
    alpha = layer.bcq_alpha.float().index_select(1, block_group)  # [k, K/G, N]
    low = layer.bcq_offset.float().index_select(0, block_group) - alpha.sum(0)
    G = layer.K // layer.n_groups
    return CPUQuantizedLinear(
        "native",
        **base,
        group_size=G,
        perm=perm,
        native=pack_native_planes(beta, 2 * alpha, low, G),
    )


def bcq_matmul(x: torch.Tensor, layer: BCQTensors, *, backend: str | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] · W: backend None picks by device (cuda → "triton", else
    "torch", the fp32 reference)."""
    if backend is None:
        backend = "triton" if x.is_cuda else "torch"
    if backend == "triton":
        from .bcq_triton import bcq_matmul_triton

        return bcq_matmul_triton(x, layer)
    if backend == "torch":
        return bcq_matmul_reference(x, layer)
    raise ValueError(f"backend={backend!r} is not supported: use None, 'triton' or 'torch'")


_lock = threading.Lock()
_op: Any = None


def register_bcq_op() -> Any:
    """Register `tsq::bcq_matmul` (idempotent): (x, bcq_bits, bcq_alpha, bcq_offset, g_idx?) ->
    y [..., N]; CUDA runs the Triton kernel, every other device the torch reference."""
    global _op
    with _lock:
        if _op is not None:
            return _op

        @torch.library.custom_op(BCQ_OP_NAME, mutates_args=())
        def _bcq_matmul(
            x: torch.Tensor,
            bcq_bits: torch.Tensor,
            bcq_alpha: torch.Tensor,
            bcq_offset: torch.Tensor,
            g_idx: torch.Tensor | None,
        ) -> torch.Tensor:
            return bcq_matmul_reference(x, BCQTensors(bcq_bits, bcq_alpha, bcq_offset, g_idx))

        @_bcq_matmul.register_kernel("cuda")
        def _cuda(x, bcq_bits, bcq_alpha, bcq_offset, g_idx):
            from .bcq_triton import launch_bcq_tensors

            x2 = x.reshape(-1, x.shape[-1]).contiguous()
            y = launch_bcq_tensors(x2, bcq_bits, bcq_alpha, bcq_offset, g_idx)
            return y.reshape(*x.shape[:-1], y.shape[-1])

        @_bcq_matmul.register_fake
        def _fake(x, bcq_bits, bcq_alpha, bcq_offset, g_idx):
            return x.new_empty(*x.shape[:-1], bcq_bits.shape[2])

        _op = torch.ops.tsq.bcq_matmul
        return _op


def bcq_matmul_op(x: torch.Tensor, layer: BCQTensors) -> torch.Tensor:
    """`bcq_matmul` through the registered custom op (call `register_bcq_op()` at load time)."""
    op = _op if _op is not None else register_bcq_op()
    return op(x, layer.bcq_bits, layer.bcq_alpha, layer.bcq_offset, layer.g_idx)
