"""The specification of the dequant-matmul: y = x · W with W decoded from a `GPTQLayer`, in torch.

With K = in_features, N = out_features and the layer's tensors exactly as stored (layout and
its validation in `tsq_vllm.format.gptq`):

  x        [M, K]            fp16 / bf16 (fp32 accepted here, not by the Triton kernels)
  layer    GPTQLayer         g_idx None means k // G (no act-order)

  W[k, n] = scales[g(k), n] * (code[k, n] - z[g(k), n]),   y = x · W   (W is nn.Linear.weight.T)

`dequant_matmul_reference` computes this in fp32 and casts to x.dtype; every kernel is tested
against it. The layer validates itself; `check_input` is the one place that says which
activations fit a layer, and every backend calls it.

`int8_activation_matmul_reference` is the spec of the opt-in CPU path that also quantizes the
activations (W-codes times int8 x, like llama.cpp's 8-bit activations): per row m and group g,

  x8[m, k] = round(x[m, k] · 127 / amax[m, g]),  sx[m, g] = amax[m, g] / 127   (fp32, ties to even)
  y[m, n] = Σ_g scales[g, n] · (sx[m, g] · Σ_{k in g} x8[m, k] · code[k, n]
                                − z[g, n] · Σ_{k in g} x[m, k])

so only the code term sees the rounded x; the zero term keeps x's exact group sums.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..format.gptq import GPTQLayer

__all__ = [
    "Problem",
    "check_input",
    "dequant_matmul_reference",
    "int8_activation_matmul_reference",
    "quantize_activations",
]

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Problem(NamedTuple):
    """Sizes of one call, after validation: x is [M, K], W is [K, N] in n_groups groups of G
    rows."""

    M: int
    K: int
    N: int
    n_groups: int
    group_size: int


def check_input(x: torch.Tensor, layer: GPTQLayer) -> Problem:
    """Validate x [M, K] (already 2-D) against the layer: dtype, K and device. Returns the sizes."""
    if x.dim() != 2:
        raise ValueError(
            f"x has shape {tuple(x.shape)}: expected [M, K] (flatten leading dims first)"
        )
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(
            f"x has dtype {x.dtype}: use float16, bfloat16 or float32 (cast the activations)"
        )
    M, K = x.shape
    if K != layer.K:
        raise ValueError(
            f"x has K={K} input features but the layer takes K={layer.K} (qweight has shape "
            f"{tuple(layer.qweight.shape)} at {layer.bits} bits): check that x matches this layer"
        )
    if layer.qweight.device != x.device:
        raise ValueError(
            f"the layer is on {layer.qweight.device} but x is on {x.device}: move the layer's "
            "tensors to x's device"
        )
    return Problem(M, K, layer.N, layer.n_groups, layer.group_size)


def dequant_matmul_reference(x: torch.Tensor, layer: GPTQLayer) -> torch.Tensor:
    """y [..., N] = x [..., K] · W [K, N], W decoded from the layer, computed in fp32."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    p = check_input(x2, layer)
    w = layer.dequantize(dtype=torch.float32)
    return (x2.float() @ w).to(x.dtype).reshape(*lead, p.N)


def quantize_activations(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8 [M, K], sx [M, K/group_size]) with x ≈ sx · x8 per row and group, x8 integers in
    [-127, 127] held as fp32; an all-zero group has sx = 0 and x8 = 0."""
    xg = x.float().unflatten(-1, (-1, group_size))  # [M, K/G, G]
    amax = xg.abs().amax(-1)  # [M, K/G]
    # A true fp32 division, as the kernel does: torch computes `127.0 / amax` as
    # reciprocal(amax)·127, one rounding more, which moves x·inv off an exact tie now and then.
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return torch.round(xg * inv[..., None]).flatten(-2), amax / 127.0


def int8_activation_matmul_reference(x: torch.Tensor, layer: GPTQLayer) -> torch.Tensor:
    """y [..., N] as the int8-activation path computes it (module docstring), in float64 and
    cast to x.dtype. Only for layers without act-order: x's groups are the weight's."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    p = check_input(x2, layer)
    if not layer.is_sequential:
        raise ValueError("int8 activations need g_idx = k // group_size: this layer has act-order")
    G = p.group_size
    codes, zeros = layer.unpack()  # [K, N], [n_groups, N]
    x8, sx = quantize_activations(x2, G)
    q = codes.double().unflatten(0, (p.n_groups, G))  # [n_groups, G, N]
    c = torch.einsum("mgk,gkn->mgn", x8.double().unflatten(-1, (p.n_groups, G)), q)
    xsum = x2.float().unflatten(-1, (p.n_groups, G)).sum(-1).double()  # [M, n_groups]
    s = layer.scales.double()  # [n_groups, N]
    y = (s * (sx.double()[..., None] * c - zeros.double() * xsum[..., None])).sum(1)
    return y.to(x.dtype).reshape(*lead, p.N)
