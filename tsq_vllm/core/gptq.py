"""GPTQ (Frantar et al., 2023) with static groups: the grid is fixed before the column loop.

For a weight W [N, K] and Hessian H = E[X Xᵀ] [K, K], GPTQ quantizes the columns of W one at a
time and spreads each column's rounding error over the columns not yet quantized, using the
upper Cholesky factor of H⁻¹:

  for column j:   c_j = round(w_j / s + z),  q_j = s (c_j − z)
                  Err_j = (w_j − q_j) / Hinv[j, j]
                  W[:, j+1:] −= Err_j · Hinv[j, j+1:]

Updates are applied lazily inside blocks of B columns and to the rest of W once per block, so
most of the work is a GEMM. Static groups: the scales and zeros come in as an argument (from
min-max, an MSE search or stage 1) instead of being recomputed when the loop enters a group;
that is what lets stage 1 choose them with H and stage 2 refine them afterwards.
"""

from __future__ import annotations

import torch

from .grid import Grid

__all__ = ["asymmetric_target", "gptq_quantize", "inverse_hessian_factor"]


def inverse_hessian_factor(H: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U), from a damped, positive definite H.

    The factorizations run in `dtype` (float64 by default; float32 is meant for GPUs,
    benchmarks/precision.py measures what it costs); U is returned in float32."""
    L, info = torch.linalg.cholesky_ex(H.to(dtype))
    if int(info):
        raise ValueError(
            "H is not positive definite even after damping: raise damp (e.g. 0.05) or use more "
            "calibration tokens"
        )
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True).float()


def asymmetric_target(
    W: torch.Tensor,
    H: torch.Tensor,
    R: torch.Tensor,
    alpha: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """W' = W − α·W R H⁻¹ [N, K]: GPTAQ's asymmetric calibration (arXiv 2504.02692) as a target.

    With R = E[ΔX Xᵀ], the weight whose outputs on the quantized stream X best match W's on the FP
    stream X̃ is w'ᵀ = wᵀE[X̃Xᵀ]H⁻¹ = wᵀ(H − R)H⁻¹, and E‖qᵀX − wᵀX̃‖² = (q − w')ᵀH(q − w') + const.
    So GPTQ (and its grid search) run on W' minimize the FP-stream error, and the codes — not only
    the scales — absorb it. α < 1 damps the correction (GPTAQ's reference code uses 0.25).
    H must be the damped Hessian (positive definite); the solve runs in `dtype`.
    """
    L, info = torch.linalg.cholesky_ex(H.to(dtype))
    if int(info):
        raise ValueError("H is not positive definite even after damping: raise damp (e.g. 0.05)")
    WR = W.to(dtype) @ R.to(dtype)  # [N, K]: rows wᵀR
    return (W.to(dtype) - alpha * torch.cholesky_solve(WR.t(), L).t()).to(W.dtype)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: Grid,
    group_size: int,
    *,
    block_size: int = 128,
    factor_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, float]:
    """Integer codes [N, K] for W [N, K] on the fixed grid, minimizing (q − w)ᵀ H (q − w) per row.

    H must already be damped (see `damp_hessian`). Column j belongs to group j // group_size.
    Also returns Σ Err², which equals Σ_rows (q − w)ᵀ H (q − w) exactly for the H given: the
    Cholesky factor splits the quadratic form into one independent square per column.
    """
    W = W.float().clone()
    N, K = W.shape
    maxq = grid.maxq
    Hinv = inverse_hessian_factor(H, factor_dtype)
    codes = torch.zeros(N, K, dtype=torch.float32, device=W.device)
    loss = 0.0
    scale = grid.scale.float()  # [N, n_groups]
    zero = grid.zero.float()

    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()  # [N, B]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = (i1 + i) // group_size
            s, z = scale[:, g], zero[:, g]
            w = W1[:, i]
            c = torch.clamp(torch.round(w / s) + z, 0, maxq)
            q = s * (c - z)
            codes[:, i1 + i] = c
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        loss += float(Err1.square().sum())

    return codes.to(torch.int64), loss
