"""The specification of the dequant-matmul: y = x · W with W decoded from a `GPTQLayer`, in torch.

With K = in_features, N = out_features and the layer's tensors exactly as stored (layout and
its validation in `tsq_vllm.format.gptq`):

  x        [M, K]            fp16 / bf16 (fp32 accepted here, not by the Triton kernels)
  layer    GPTQLayer         g_idx None means k // G (no act-order)

  W[k, n] = scales[g(k), n] * (code[k, n] - z[g(k), n]),   y = x · W   (W is nn.Linear.weight.T)

`dequant_matmul_reference` computes this in fp32 and casts to x.dtype; every kernel is tested
against it. The layer validates itself; `check_input` is the one place that says which
activations fit a layer, and every backend calls it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..format.gptq import GPTQLayer

__all__ = ["Problem", "check_input", "dequant_matmul_reference"]

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
