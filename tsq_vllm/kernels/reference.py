"""The specification of the dequant-matmul: y = x · W with W decoded from GPTQ tensors, in torch.

With K = in_features, N = out_features, group size G = K / n_g and the tensors of a checkpoint
exactly as stored (layout in `tsq_vllm.format.gptq`):

  x        [M, K]            fp16 / bf16 (fp32 accepted here, not by the Triton kernels)
  qweight  int32 [K*b/32, N] codes packed along K
  qzeros   int32 [n_g, N*b/32] zero points packed along N; "gptq" stores z - 1, "gptq_v2" z
  scales   [n_g, N]          fp16 (bf16 / fp32 accepted)
  g_idx    int32 [K] or None  group of input column k; None means k // G (no act-order)

  W[k, n] = scales[g(k), n] * (code[k, n] - z[g(k), n]),   y = x · W   (W is nn.Linear.weight.T)

`dequant_matmul_reference` computes this in fp32 and casts to x.dtype; every kernel is tested
against it. `check_inputs` is the one place that says which inputs are valid; every backend calls
it so all of them reject the same things with the same messages.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..format.gptq import CHECKPOINT_FORMATS, dequantize
from ..format.packing import SUPPORTED_BITS

__all__ = ["Problem", "check_inputs", "zero_offset", "sequential_g_idx", "dequant_matmul_reference"]

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Problem(NamedTuple):
    """Sizes of one call, after validation: x is [M, K], W is [K, N] in n_g groups of G rows."""

    M: int
    K: int
    N: int
    n_groups: int
    group_size: int


def zero_offset(checkpoint_format: str) -> int:
    """What to add to a stored zero point to get z: 1 for GPTQ v1 (stores z - 1), 0 for v2."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"checkpoint_format={checkpoint_format!r} is not supported: use one of {CHECKPOINT_FORMATS}"
        )
    return 1 if checkpoint_format == "gptq" else 0


def check_inputs(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
) -> Problem:
    """Validate shapes, dtypes and devices; x must already be 2-D [M, K]. Returns the sizes."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported: use one of {SUPPORTED_BITS}")
    if x.dim() != 2:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected [M, K] (flatten leading dims first)")
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}: use float16, bfloat16 or float32 (cast the activations)")
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} has dtype {t.dtype}: GPTQ packs codes into int32 words; load it as int32")
        if t.dim() != 2:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: expected a 2-D packed tensor")
    if scales.dtype not in _SCALE_DTYPES or scales.dim() != 2:
        raise TypeError(f"scales has dtype {scales.dtype}, shape {tuple(scales.shape)}: expected fp16 [K/G, N]")
    M, K = x.shape
    if K % 32:
        raise ValueError(f"K={K} (x.shape[-1]) is not a multiple of 32: GPTQ packing needs whole 32-value runs; pad K")
    N = qweight.shape[1]
    if qweight.shape[0] != K * bits // 32:
        raise ValueError(
            f"qweight has shape {tuple(qweight.shape)}: expected [K*bits/32, N] = [{K * bits // 32}, {N}] "
            f"for K={K}, bits={bits}; check bits and that x matches this layer"
        )
    n_groups = scales.shape[0]
    if scales.shape[1] != N:
        raise ValueError(f"scales has shape {tuple(scales.shape)}: expected [K/G, N] with N={N} (qweight.shape[1])")
    if n_groups == 0 or K % n_groups:
        raise ValueError(
            f"scales has {n_groups} groups for K={K}: K must split into equal groups (n_g = K / G); "
            "re-quantize with a group size that divides K"
        )
    G = K // n_groups
    if G % 32:
        raise ValueError(f"group size G = K / n_g = {G} is not a multiple of 32: use G in (32, 64, 128) or -1")
    if (N * bits) % 32:
        raise ValueError(
            f"N={N} at {bits} bits does not fill whole int32 words in qzeros (N*bits % 32 != 0): "
            "pad N to a multiple of 32"
        )
    if tuple(qzeros.shape) != (n_groups, N * bits // 32):
        raise ValueError(
            f"qzeros has shape {tuple(qzeros.shape)}: expected [K/G, N*bits/32] = [{n_groups}, {N * bits // 32}] "
            f"for bits={bits}; check bits and group size"
        )
    if g_idx is not None:
        if g_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"g_idx has dtype {g_idx.dtype}: expected int32 (or int64)")
        if tuple(g_idx.shape) != (K,):
            raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}: expected [K] = [{K}]")
    tensors = [("qweight", qweight), ("qzeros", qzeros), ("scales", scales)]
    if g_idx is not None:
        tensors.append(("g_idx", g_idx))
    for name, t in tensors:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: move the layer's tensors to x's device")
    return Problem(M, K, N, n_groups, G)


def sequential_g_idx(g_idx: torch.Tensor | None, group_size: int) -> bool:
    """True when g_idx is k // G (no act-order), so it can be dropped (passed as None).

    Call it once when the weights are loaded, not per forward: on CUDA it synchronizes. Kernels
    take the faster path (one group per K tile, no per-row gathers) when g_idx is None.
    """
    if g_idx is None:
        return True
    expected = torch.arange(g_idx.numel(), device=g_idx.device) // group_size
    return bool(torch.equal(g_idx.long(), expected))


def dequant_matmul_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    checkpoint_format: str = "gptq",
) -> torch.Tensor:
    """y [..., N] = x [..., K] · W [K, N], W decoded from the checkpoint tensors, computed in fp32."""
    zero_offset(checkpoint_format)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    p = check_inputs(x2, qweight, qzeros, scales, g_idx, bits)
    if g_idx is None:
        g_idx = torch.arange(p.K, device=x.device, dtype=torch.int32) // p.group_size
    w = dequantize(qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype=torch.float32)
    return (x2.float() @ w).to(x.dtype).reshape(*lead, p.N)
