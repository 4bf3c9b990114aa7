"""Quantize one linear layer: the contract every other part of the project goes through.

    qw = quantize_weight(W, H, bits=3, group_size=64, R=R)
    qw.dequantize()                       # [N_out, K_in], what the quantized layer computes with
    qw.to_gptq("gptq")                    # the packed checkpoint tensors

Steps, each switchable for ablations:
  1. grid     stage 1 (clip search scored by H_ii blocks), or min-max / MSE search (plain GPTQ)
  2. codes    GPTQ on that fixed grid (or round-to-nearest with gptq=False)
  3. stage 2  coordinate descent on the scales with codes and zeros frozen, with R if given
Scales are rounded to fp16 after each step that sets them, because the checkpoint stores fp16:
the objective that is optimized and logged is the one the checkpoint really has.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..core.gptq import asymmetric_target, gptq_quantize
from ..core.grid import quantize_codes, search_grid
from ..core.hessian import damp_hessian, dead_columns
from ..core.stage2 import energy_match as match_energy
from ..core.stage2 import layer_objective, output_stats, refine_scales, scale_system
from ..format.gptq import GPTQTensors, pack_linear
from ..format.packing import check_bits

__all__ = [
    "DEFAULT_ERROR_FEEDBACK_ALPHA", "DEFAULT_GPTAQ_ALPHA", "DEFAULT_SCALE_BOX", "QuantizedWeight", "quantize_weight",
]

# The best of the grid measured on SmolLM2-135M INT2 and INT3 g64 (benchmarks/results/stage2_variants.md).
DEFAULT_ERROR_FEEDBACK_ALPHA = 0.25
DEFAULT_SCALE_BOX = 2.0
DEFAULT_GPTAQ_ALPHA = 0.25


@dataclass
class QuantizedWeight:
    """A quantized [N, K] weight in `nn.Linear` orientation.

    codes [N, K] int64, scales [N, n_g] float32 (fp16-representable), zeros [N, n_g] int64,
    g_idx [K] int64 (group of each input column), plus per-step statistics.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    stats: dict[str, float] = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx
        return self.scales[:, g] * (self.codes - self.zeros[:, g]).float()  # [N, K]

    def to_gptq(self, checkpoint_format: str = "gptq") -> GPTQTensors:
        return pack_linear(self.codes, self.scales, self.zeros, self.g_idx, self.bits, checkpoint_format)


def _to_fp16(s: torch.Tensor) -> torch.Tensor:
    # Keep the sign and stay away from fp16 underflow/overflow: the checkpoint stores fp16.
    return s.clamp(-65504, 65504).half().float()


def quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool = False,
    stage1: bool = True,
    stage2: bool = True,
    R: torch.Tensor | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    gptq: bool = True,
    scale_search: str = "minmax",
    mse_norm: float = 2.0,
    clip_points: int = 100,
    stage2_sweeps: int = 20,
    zero_min: int = 1,
    block_size: int = 128,
    D: torch.Tensor | None = None,
    error_feedback_alpha: float = DEFAULT_ERROR_FEEDBACK_ALPHA,
    scale_box: float | None = DEFAULT_SCALE_BOX,
    energy_match: bool = False,
    gptaq_alpha: float = DEFAULT_GPTAQ_ALPHA,
) -> QuantizedWeight:
    """Quantize W [N_out, K_in] given H = E[X Xᵀ] [K, K] (and R = E[(X − X̃) Xᵀ] for stage 2).

    stage1: choose each group's clip by (q − w)ᵀ H_ii (q − w); otherwise `scale_search`
      ("minmax", or "mse" with exponent `mse_norm`: the plain-GPTQ choices).
    stage2: refine the scales after GPTQ on eq. (7), with R when given.
    act_order: process columns by decreasing H_jj; groups are formed in that order and g_idx
      maps every input column to its group (GPTQ `desc_act`).
    gptq: False rounds to nearest on the grid instead (the RTN baseline).
    zero_min: smallest asymmetric zero point; 1 for GPTQ v1 checkpoints, which store z − 1.
    D: E[ΔX ΔXᵀ] (with R): makes the true eq. (7) and the FP output energy available to the stats.
    error_feedback_alpha: weight of R in stage 2 (1: the paper's eq. (7), 0: R ignored).
    scale_box: β keeps stage 2's scales in [s0/β, β·s0] around the grid's s0 > 0 (None: unbounded).
    energy_match: after stage 2, rescale each row so qᵀHq equals the FP output energy (needs D with R).
    gptaq_alpha: with R, the grid and GPTQ target W − α·W R H⁻¹ instead of W (GPTAQ); 0 is off.
    stats: "loss_gptq" and "loss" (eq. (7) with the undamped H and R weighted by error_feedback_alpha,
      without its constant; before and after stage 2),
      "time_grid", "time_gptq", "time_stage2" in seconds, "stage2_sweeps"; when the true eq. (7) is
      known (no R, or R with D): "rel_error[_gptq]" = E‖QX − WX̃‖² / E‖WX̃‖² and
      "energy_ratio[_gptq]" = E‖QX‖² / E‖WX̃‖², after and before stage 2.
    """
    check_bits(bits)
    N, K = W.shape
    if H.shape != (K, K):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected [K, K] = [{K}, {K}] for W {tuple(W.shape)}")
    if R is not None and R.shape != (K, K):
        raise ValueError(f"R has shape {tuple(R.shape)}, expected [{K}, {K}]")
    if K % group_size:
        raise ValueError(
            f"in_features={K} is not a multiple of group_size={group_size}: pick a group size "
            f"that divides {K}"
        )
    stats: dict[str, float] = {}
    H = H.float()
    # Work in processing order, where groups are contiguous column ranges.
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(K)
    W = W.float()[:, perm]  # [N, K]
    H = H[perm][:, perm]
    R = None if R is None else R.float()[perm][:, perm]
    D = None if D is None else D.float()[perm][:, perm]
    if energy_match and R is not None and D is None:
        raise ValueError("energy_match needs D = E[ΔX ΔXᵀ] when R is given: the FP output energy depends on it")
    true_stats = R is None or D is not None
    Hd = damp_hessian(H, damp)
    gptaq = gptaq_alpha > 0 and R is not None
    Wq = asymmetric_target(W, Hd, R, gptaq_alpha) if gptaq else W.clone()
    Wq[:, dead_columns(H)] = 0  # a dead input's weight is free: zero quantizes exactly

    t = time.perf_counter()
    method = "hessian" if stage1 else scale_search
    grid = search_grid(Wq, bits, group_size, sym=sym, method=method, H=Hd, norm=mse_norm,
                       points=clip_points, zero_min=zero_min)
    grid.scale = _to_fp16(grid.scale)
    stats["time_grid"] = time.perf_counter() - t

    t = time.perf_counter()
    col_group = torch.arange(K) // group_size  # [K]
    if gptq:
        codes, loss_damped = gptq_quantize(Wq, Hd, grid, group_size, block_size=block_size)
    else:
        codes = quantize_codes(Wq, grid.scale[:, col_group], grid.zero[:, col_group], bits).long()
    stats["time_gptq"] = time.perf_counter() - t

    t = time.perf_counter()
    U = (codes - grid.zero[:, col_group]).float()  # [N, K] frozen integer weights
    scale = grid.scale
    if stage2:
        # Stage 2 targets the true objective (undamped H); it needs no inverse.
        system = scale_system(W, U, H, R, group_size, D=D)
        res = refine_scales(W, U, grid.scale, H, R, group_size, alpha=error_feedback_alpha, box=scale_box,
                            max_sweeps=stage2_sweeps, system=system)
        scale = _to_fp16(match_energy(system, res.scale) if energy_match else res.scale)
        stats["stage2_sweeps"] = len(res.objective) - 1
        stats["stage2_at_bound"] = res.at_bound / res.scale.numel()
        # The objective stage 2 minimizes: eq. (7) without its constant, R weighted by α.
        stats["loss_gptq"] = system.objective(grid.scale.double(), error_feedback_alpha)
        stats["loss"] = system.objective(scale.double(), error_feedback_alpha)
        if true_stats:
            for key, s in (("_gptq", grid.scale), ("", scale)):
                o = system.output_stats(s)
                stats["rel_error" + key], stats["energy_ratio" + key] = o.rel_error, o.energy_ratio
    elif gptq and not gptaq:
        # GPTQ's own error sum is the damped objective; removing the damping costs no GEMM.
        dQ = scale[:, col_group] * U - Wq  # [N, K]
        err_h = loss_damped - float((torch.diagonal(Hd) - torch.diagonal(H)) @ dQ.square().sum(0))
        loss = err_h
        if R is not None:
            loss += 2 * float(((W @ R) * dQ).sum())
        stats["loss_gptq"] = stats["loss"] = loss
        if true_stats:
            o = output_stats(W, scale[:, col_group] * U, H, R, D, err_h=err_h)  # H is 0 on dead inputs
            stats["rel_error_gptq"] = stats["rel_error"] = o.rel_error
            stats["energy_ratio_gptq"] = stats["energy_ratio"] = o.energy_ratio
    else:
        stats["loss_gptq"] = stats["loss"] = layer_objective(W, scale[:, col_group] * U, H, R, dtype=torch.float32)
        if true_stats:
            o = output_stats(W, scale[:, col_group] * U, H, R, D)
            stats["rel_error_gptq"] = stats["rel_error"] = o.rel_error
            stats["energy_ratio_gptq"] = stats["energy_ratio"] = o.energy_ratio
    stats["time_stage2"] = time.perf_counter() - t

    inv = torch.argsort(perm)
    return QuantizedWeight(
        codes=codes[:, inv].contiguous(),
        scales=scale.contiguous(),
        zeros=grid.zero.contiguous(),
        g_idx=col_group[inv],  # group of each original input column
        bits=bits,
        group_size=group_size,
        sym=sym,
        stats=stats,
    )
