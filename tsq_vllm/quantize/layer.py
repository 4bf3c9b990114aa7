"""Quantize one linear layer: the contract every other part of the project goes through.

    qw = quantize_weight(W, H, LayerScheme(bits=3, group_size=64), R=R)
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

import functools
import operator
import time
from dataclasses import dataclass, field

import torch

from ..core.gptq import HessianFactor, asymmetric_target, gptq_quantize
from ..core.grid import Grid, quantize_codes, search_grid
from ..core.hessian import DampedHessian, RowFeedback, dead_columns
from ..core.stage2 import (
    OutputStats,
    ScaleSystem,
    output_stats,
    refine_system,
    scale_system,
)
from ..core.stage2 import energy_match as match_energy
from ..format.gptq import CHECKPOINT_FORMATS, GPTQLayer, pack_linear
from .linear_input import LinearInput, prepare_input
from .row_blocks import row_blocks
from .scheme import LayerScheme

__all__ = [
    "LayerProblem",
    "LinearInput",
    "QuantizedWeight",
    "linear_pass",
    "prepare_input",
    "prepare_layer",
    "quantize_weight",
    "quantize_weight_on",
    "to_fp16",
]


@dataclass
class QuantizedWeight:
    """A quantized [N, K] weight in `nn.Linear` orientation.

    codes [N, K] uint8 (every supported width fits; an int64 lm_head's codes would be 2 GiB),
    scales [N, n_groups] float32 (fp16-representable), zeros [N, n_groups] int64, g_idx [K] int64
    (group of each input column), plus per-step statistics.
    grid_scales [N, n_groups]: the scales GPTQ quantized with (the centre of the scale box).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    grid_scales: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        """W [N, K] float32 = s (codes − z), a row block at a time: elementwise the same values,
        without the whole weight's int64 and float32 temporaries."""
        g = self.g_idx
        out = torch.empty(self.codes.shape, dtype=torch.float32, device=self.codes.device)
        for r in row_blocks(*self.codes.shape):
            out[r] = self.scales[r][:, g] * (self.codes[r] - self.zeros[r][:, g]).float()
        return out

    def pack(self, checkpoint_format: str = "gptq") -> GPTQLayer:
        """The checkpoint tensors (what the pipeline writes): GPTQ at `bits`."""
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"checkpoint_format={checkpoint_format!r}: tsq writes one of {CHECKPOINT_FORMATS}"
            )
        return self.to_gptq(checkpoint_format)

    def to_gptq(self, checkpoint_format: str = "gptq") -> GPTQLayer:
        """The packed checkpoint tensors, on CPU whatever device the math ran on."""
        return pack_linear(
            self.codes.cpu(),
            self.scales.cpu(),
            self.zeros.cpu(),
            self.g_idx.cpu(),
            self.bits,
            checkpoint_format,
            group_size=self.group_size,
        )


def to_fp16(s: torch.Tensor) -> torch.Tensor:
    # Keep the sign and stay away from fp16 underflow/overflow: the checkpoint stores fp16.
    return s.clamp(-65504, 65504).half().float()


@dataclass
class LayerProblem:
    """One layer in processing order (act-order permutes the columns; groups are then contiguous).

    W, H, R, D permuted by `perm`; Hd the damped H and `factor` its factorizations (both shared
    with the other linears of the same input); Wq the weight the grid and GPTQ quantize (W, or
    GPTAQ's target), dead inputs zeroed.
    """

    W: torch.Tensor
    H: torch.Tensor
    R: torch.Tensor | None
    D: torch.Tensor | None
    Hd: DampedHessian
    Wq: torch.Tensor
    perm: torch.Tensor
    gptaq: bool
    factor: HessianFactor
    feedback: RowFeedback | None = None


def prepare_layer(
    W: torch.Tensor, inp: LinearInput, feedback: RowFeedback | None = None
) -> LayerProblem:
    """Check W against its input and put it in processing order (see `quantize_weight`);
    `feedback`: W's rows' share of the reader's `RowFeedback` (default: all of it)."""
    group_size = inp.scheme.group_size
    N, K = W.shape
    if inp.H.shape != (K, K):
        raise ValueError(
            f"H has shape {tuple(inp.H.shape)}, expected [K, K] = [{K}, {K}] for W {tuple(W.shape)}"
        )
    if K % group_size:
        raise ValueError(
            f"in_features={K} is not a multiple of group_size={group_size}: pick a group size "
            f"that divides {K}"
        )
    # [N, K] in processing order; with the identity order the caller's W itself (nothing writes
    # to it in place), not a gathered copy (0.2 GiB for an 8B down_proj).
    W = W.float()[:, inp.perm] if inp.scheme.act_order else W.float()
    if inp.feedbacks is not None:
        feedback = feedback if feedback is not None else inp.feedback
        if feedback is None:
            raise ValueError("this input has per-linear feedback: quantize on inp.reader(name)")
        if feedback.WR.shape != W.shape:
            raise ValueError(f"feedback WR {tuple(feedback.WR.shape)} for W {tuple(W.shape)}")
        if inp.scheme.act_order:  # (a copy, which the identity order does not need)
            feedback = RowFeedback(feedback.WR[:, inp.perm], feedback.w_d_w)
    if inp.gptaq and feedback is not None:
        Wq = asymmetric_target(W, inp.factor, None, inp.scheme.gptaq_alpha, WR=feedback.WR)
    elif inp.gptaq:
        Wq = asymmetric_target(W, inp.factor, inp.R, inp.scheme.gptaq_alpha)
    else:
        Wq = W.clone()
    Wq[:, dead_columns(inp.H)] = 0  # a dead input's weight is free: zero quantizes exactly
    return LayerProblem(
        W, inp.H, inp.R, inp.D, inp.Hd, Wq, inp.perm, inp.gptaq, inp.factor, feedback
    )


def linear_pass(
    p: LayerProblem, scheme: LayerScheme, bits: int
) -> tuple[Grid, torch.Tensor, float, dict[str, float]]:
    """Steps 1 and 2 at `bits`: the grid (scales fp16-rounded), then GPTQ (or RTN) codes [N, K].

    Returns the grid, the codes, GPTQ's damped error sum (0 for RTN) and the step times.
    """
    s = scheme
    stats: dict[str, float] = {}
    t = time.perf_counter()
    grid = search_grid(
        p.Wq,
        bits,
        s.group_size,
        sym=s.sym,
        method=s.grid_method,
        H=p.Hd,
        norm=s.mse_norm,
        points=s.clip_points,
        zero_min=s.zero_min,
    )
    grid.scale = to_fp16(grid.scale)
    stats["time_grid"] = time.perf_counter() - t

    t = time.perf_counter()
    col_group = torch.arange(p.W.shape[1], device=p.W.device) // s.group_size  # [K]
    loss_damped = 0.0
    if s.gptq:
        codes, loss_damped = gptq_quantize(
            p.Wq, p.factor, grid, s.group_size, block_size=s.block_size, order=p.factor.order
        )
    else:
        codes = quantize_codes(p.Wq, grid.scale[:, col_group], grid.zero[:, col_group], bits).long()
    stats["time_gptq"] = time.perf_counter() - t
    return grid, codes, loss_damped, stats


def quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: LayerScheme,
    R: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize W [N, K] given H = E[X Xᵀ] [K, K] (and R = E[(X − X̃) Xᵀ] for stage 2).

    `scheme` says which steps run and how (see `LayerScheme`).
    D: E[ΔX ΔXᵀ] (with R): makes the true eq. (7) and the FP output energy available to the stats.
    stats: "loss_gptq" and "loss" (eq. (7) with the undamped H and R weighted by
      `scheme.error_feedback_alpha`, without its constant; before and after stage 2),
      "time_grid", "time_gptq", "time_stage2" in seconds, "stage2_sweeps", "stage2_at_bound";
      when the true eq. (7) is known (no R, or R with D): "rel_error[_gptq]" = E‖QX − WX̃‖² / E‖WX̃‖²
      and "energy_ratio[_gptq]" = E‖QX‖² / E‖WX̃‖², after and before stage 2.
    """
    return quantize_weight_on(W, prepare_input(H, scheme, R, D))


def quantize_weight_on(W: torch.Tensor, inp: LinearInput) -> QuantizedWeight:
    """`quantize_weight` on an input prepared once for all the linears that read it (its scheme).

    A wide W is quantized in row blocks (`row_blocks`; the input must be prepared for one reader
    per block): the grids, codes and stage 2's per-row systems block by block, stage 2's sweeps
    once on all rows. Stats are sums over rows, so the blocks' add up.
    """
    s = inp.scheme
    N, K = W.shape
    col_group = torch.arange(K, device=W.device) // s.group_size  # [K]
    inv = torch.argsort(inp.perm)
    codes = torch.empty(N, K, dtype=torch.uint8, device=W.device)
    fb = inp.feedback
    parts = [
        _quantize_rows(W[rows], inp, codes[rows], inv, None if fb is None else fb.rows(rows))
        for rows in row_blocks(N, K)
    ]
    grid_scale = torch.cat([b.grid.scale for b in parts])
    stats = {k: sum(b.stats[k] for b in parts) for k in ("time_grid", "time_gptq")}
    t = time.perf_counter()
    scale = grid_scale
    if s.stage2:
        system = ScaleSystem.cat([b.system for b in parts if b.system is not None])
        res = refine_system(
            system,
            grid_scale,
            alpha=s.error_feedback_alpha,
            box=s.scale_box or None,
            max_sweeps=s.stage2_sweeps,
        )
        scale = to_fp16(match_energy(system, res.scale) if s.energy_match else res.scale)
        stats["stage2_sweeps"] = len(res.objective) - 1
        stats["stage2_at_bound"] = res.at_bound / res.scale.numel()
        # The objective stage 2 minimizes: eq. (7) without its constant, R weighted by α.
        stats["loss_gptq"] = system.objective(grid_scale.double(), s.error_feedback_alpha)
        stats["loss"] = system.objective(scale.double(), s.error_feedback_alpha)
        if inp.R is None or inp.D is not None:
            for key, sc in (("_gptq", grid_scale), ("", scale)):
                o = system.output_stats(sc)
                stats["rel_error" + key], stats["energy_ratio" + key] = o.rel_error, o.energy_ratio
    else:
        stats["loss_gptq"] = stats["loss"] = functools.reduce(operator.add, (b.loss for b in parts))
        if parts[0].quality is not None:
            o = functools.reduce(operator.add, (b.quality for b in parts if b.quality is not None))
            stats["rel_error_gptq"] = stats["rel_error"] = o.rel_error
            stats["energy_ratio_gptq"] = stats["energy_ratio"] = o.energy_ratio
    stats["time_stage2"] = sum(b.stats["time_stage2"] for b in parts) + time.perf_counter() - t
    return QuantizedWeight(
        codes=codes,
        scales=scale.contiguous(),
        zeros=torch.cat([b.grid.zero for b in parts]).contiguous(),
        g_idx=col_group[inv],  # group of each original input column
        bits=s.bits,
        group_size=s.group_size,
        sym=s.sym,
        grid_scales=grid_scale.contiguous(),
        stats=stats,
    )


@dataclass
class _Rows:
    """What one row block leaves for the whole linear once its [rows, K] tensors are released:
    its grid, and stage 2's system of its rows (with stage 2) or its loss and `OutputStats`
    (without; quality only when the true eq. (7) is known), and its step times."""

    grid: Grid
    system: ScaleSystem | None
    loss: float
    quality: OutputStats | None
    stats: dict[str, float]


def _quantize_rows(
    W: torch.Tensor,
    inp: LinearInput,
    codes_out: torch.Tensor,
    inv: torch.Tensor,
    feedback: RowFeedback | None,
) -> _Rows:
    """Steps 1 and 2 on rows W [n, K] (their codes into `codes_out` [n, K], in input order), and
    what stage 2 or the stats need of them."""
    s = inp.scheme
    group_size = s.group_size
    p = prepare_layer(W, inp, feedback)
    W, H, R, D, Hd, Wq, fb = p.W, p.H, p.R, p.D, p.Hd, p.Wq, p.feedback
    true_stats = R is None or D is not None
    grid, codes, loss_damped, stats = linear_pass(p, s, s.bits)
    codes_out.copy_(codes[:, inv])
    col_group = torch.arange(W.shape[1], device=W.device) // group_size  # [K]

    t = time.perf_counter()
    U = (codes - grid.zero[:, col_group]).float()  # [n, K] frozen integer weights
    del codes
    out = _Rows(grid, None, 0.0, None, stats)
    if s.stage2:
        # Stage 2 targets the true objective (undamped H); it needs no inverse.
        out.system = scale_system(W, U, H, R, group_size, D=D, feedback=fb)
    else:
        Q = grid.scale[:, col_group] * U  # [n, K]
        if s.gptq and not p.gptaq:
            # GPTQ's own error sum is the damped objective; removing the damping costs no GEMM.
            dQ = Q - Wq
            err_h = loss_damped - float((Hd.diagonal() - torch.diagonal(H)) @ dQ.square().sum(0))
        else:
            # One Q·H GEMM, shared by the loss and the statistics (the K × K products dominate
            # an RTN run's time).
            dQ = Q - W
            err_h = float(((dQ @ H) * dQ).sum(dtype=torch.float64))
        out.loss = err_h
        if fb is not None:
            out.loss += 2 * float((fb.WR.float() * dQ).sum())
        elif R is not None:
            out.loss += 2 * float(((W @ R) * dQ).sum())
        if true_stats:  # H is 0 on dead inputs
            out.quality = output_stats(W, Q, H, R, D, err_h=err_h, feedback=fb)
    stats["time_stage2"] = time.perf_counter() - t
    return out
