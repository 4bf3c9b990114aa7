"""Block-output reconstruction of the group scales (`--refine-block`): the tensor math.

After the per-linear stages, the integer codes and zero points of every linear of a decoder
block are frozen and only the per-group scales move, jointly for the whole block, to minimize
the mean squared error between the quantized block's output on the quantized stream and the
full-precision block's output on the full-precision stream (the target AutoRound tunes its
rounding and clipping against). Each scale is parametrized as s = s_t·exp(θ) around the
per-linear solution s_t, with θ projected after every step onto the interval that keeps s in the
scale box [s0/B, B·s0] of the grid scale s0 > 0: the sign never changes and the checkpoint keeps
the box invariant of stage 2.

The loop (projected Adam, learning rate decaying linearly to 0, minibatches in a given order)
keeps the best iterate by its full-calibration loss, evaluated with the scales rounded to fp16
as the checkpoint stores them; the start is a candidate, so the block loss never gets worse.
The caller supplies the block as a function of the linears' weights (`BlockLoss`), so this
module needs no `nn.Module`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["BlockLoss", "LogScales", "RefineOutcome", "checkpoint_steps", "refine_scales_block"]

# (weights of the block's linears, batch index) -> (sum of squared errors, element count)
BlockLoss = Callable[[Sequence[torch.Tensor], int], tuple[torch.Tensor, int]]


def _fp16(s: torch.Tensor) -> torch.Tensor:
    return s.clamp(-65504, 65504).half().float()


@dataclass
class LogScales:
    """One linear's scales as s = start·exp(θ), θ ∈ [lo, hi] elementwise, codes frozen.

    start [N, n_g] (the per-linear solution, fp16-representable); U [N, K] = codes − zeros per
    column (float); g_idx [K] the group of each column; theta [N, n_g] the free parameter.
    """

    start: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    U: torch.Tensor
    g_idx: torch.Tensor
    theta: torch.Tensor

    @classmethod
    def around(
        cls,
        start: torch.Tensor,
        grid: torch.Tensor,
        U: torch.Tensor,
        g_idx: torch.Tensor,
        box: float | None,
    ) -> LogScales:
        """θ = 0 at `start`; with `box` B, s stays in [grid/B, B·grid] (grid > 0), else free.

        A scale that is not positive (fp16 underflow to 0, or a sign flip of the unbounded
        ablation) is pinned: exp(θ) could not move it across 0 anyway.
        """
        start, grid = start.float(), grid.float()
        ok = start > 0
        if box is None:
            lo = torch.full_like(start, -math.inf)
            hi = torch.full_like(start, math.inf)
        else:
            ok = ok & (grid > 0)
            ratio = torch.where(ok, grid / torch.where(ok, start, 1.0), 1.0)
            # fp16 rounding may leave `start` a hair outside the box: 0 stays feasible.
            lo = (ratio / box).log().clamp(max=0.0)
            hi = (ratio * box).log().clamp(min=0.0)
        lo, hi = torch.where(ok, lo, 0.0), torch.where(ok, hi, 0.0)
        theta = torch.zeros_like(start, requires_grad=True)
        return cls(start, lo, hi, U.float(), g_idx, theta)

    def scales(self) -> torch.Tensor:
        """The current scales [N, n_g] (differentiable in θ)."""
        return self.start * self.theta.exp()

    def weight(self, scales: torch.Tensor) -> torch.Tensor:
        """The dequantized weight [N, K] the linear computes with under `scales`."""
        return scales[:, self.g_idx] * self.U

    def project_(self) -> None:
        with torch.no_grad():
            self.theta.copy_(torch.clamp(self.theta, self.lo, self.hi))


@dataclass(frozen=True)
class RefineOutcome:
    """Best fp16 scales per linear, the full-calibration loss at the start and at the best
    iterate, the step of the best iterate (0 = the start kept) and the steps run."""

    scales: list[torch.Tensor]
    loss_start: float
    loss: float
    best_step: int
    steps: int


def checkpoint_steps(steps: int, evals: int = 2) -> list[int]:
    """Steps after which the full-calibration loss is evaluated: 0 (the start), every
    ceil(steps / evals) steps, and the last. Each costs a forward pass over every batch (a
    third of a step's cost per batch), and with the learning rate decaying to 0 the last
    iterate is nearly always the best, so only the midpoint is checked besides."""
    every = max(1, math.ceil(steps / evals))
    return sorted({0, steps, *range(every, steps, every)})


def refine_scales_block(
    params: Sequence[LogScales],
    loss: BlockLoss,
    order: Sequence[int],
    n_batches: int,
    *,
    lr: float,
) -> RefineOutcome:
    """Run len(order) projected Adam steps on θ, step t on minibatch order[t].

    Returns the candidate (start, every `checkpoint_steps` point) with the lowest loss over all
    `n_batches` batches, its scales rounded to fp16.
    """
    steps = len(order)
    checks = set(checkpoint_steps(steps))

    def full_loss(scales: list[torch.Tensor]) -> float:
        with torch.no_grad():
            ws = [p.weight(s) for p, s in zip(params, scales, strict=True)]
            sse, count = 0.0, 0
            for b in range(n_batches):
                e, n = loss(ws, b)
                sse, count = sse + float(e), count + n
        return sse / count

    best = [p.start.clone() for p in params]
    start_loss = best_loss = full_loss(best)
    best_step = 0
    thetas = [p.theta for p in params]
    opt = torch.optim.Adam(thetas, lr=lr)
    sched = torch.optim.lr_scheduler.LinearLR(
        opt, start_factor=1.0, end_factor=0.0, total_iters=steps
    )
    for t, b in enumerate(order, start=1):
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            e, n = loss([p.weight(p.scales()) for p in params], b)
            (e / n).backward()
        opt.step()
        sched.step()
        for p in params:
            p.project_()
        if t in checks:
            with torch.no_grad():
                cand = [_fp16(p.scales()) for p in params]
            value = full_loss(cand)
            if value < best_loss:
                best, best_loss, best_step = cand, value, t
    return RefineOutcome(best, start_loss, best_loss, best_step, steps)
