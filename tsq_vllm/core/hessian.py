"""Second-moment statistics of a linear layer's inputs.

  H = E[X Xᵀ]              from the inputs X that reach the layer through the already quantized
                           preceding layers (what the quantized model will really see)
  R = E[(X − X̃) Xᵀ]       with X̃ the same tokens' inputs in the full-precision model
  D = E[(X − X̃)(X − X̃)ᵀ]  tracked with R: the constant of eq. (7) and the FP output energy
                           wᵀE[X̃X̃ᵀ]w = wᵀ(H − R − Rᵀ + D)w, which the per-linear log reports

All are K×K with K = in_features. Accumulation is a running mean, so the result does not depend
on how the tokens were batched beyond rounding, and large token counts do not overflow.
H is accumulated in float64 by default: GPTQ's and GPTAQ's factorizations are built on it, and
what H has to resolve is the small end of its spectrum. The FP stream's terms (R, D, and W R
per linear below) are accumulated in float32 whatever H's dtype: no factorization sees them;
they enter only as right-hand sides damped by α (GPTAQ's target, stage 2's b_R) and as the
constant wᵀDw, and float32's rounding of them is far below what the calibration sample itself
decides (`docs/algorithm.md`, *R*, has the runs). They are most of the default's accumulation
beyond plain GPTQ's H, which float32 halves (`benchmarks/results/quantize_cost.md`).

Every consumer of R and D needs them only through one linear's weight W [N, K]: wᵀR per row (GPTAQ's
target, stage 2's b_R) and wᵀDw per row (the constant). With P = ΔX Wᵀ [T, N] these are
E[Pᵀ X] and E[P²] summed over tokens, 2·T·K·N multiply-adds instead of R's and D's 2·T·K².
Given `weights`, the accumulator tracks those `RowFeedback` terms instead of R and D: cheaper
when the linears of an input are narrow against it (down_proj: N = hidden, K = intermediate),
and no K×K matrix exists (0.8 GiB each in float32 at K = 14336).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .blocks import row_slices

__all__ = ["DampedHessian", "HessianAccumulator", "RowFeedback", "damp_hessian", "dead_columns"]


class RowFeedback(NamedTuple):
    """The full-precision stream's terms of one linear's eq. (7), through its weight W [N, K]:
    WR [N, K] = W R (rows wᵀR, float32) and w_d_w [N] = wᵀDw per row (float64)."""

    WR: torch.Tensor
    w_d_w: torch.Tensor

    def rows(self, r: slice) -> RowFeedback:
        return RowFeedback(self.WR[r], self.w_d_w[r])


class HessianAccumulator:
    """Running means of X Xᵀ and, when the full-precision stream is given, ΔX Xᵀ and ΔX ΔXᵀ, or
    with `weights` (the full-precision W [N_i, K] of the linears that read this input) their
    `RowFeedback` terms W_i R and wᵀDw per row instead."""

    def __init__(
        self,
        in_features: int,
        *,
        with_r: bool = False,
        weights: Sequence[torch.Tensor] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ):
        if weights is not None and not with_r:
            raise ValueError("per-linear feedback terms need the full-precision stream (with_r)")
        self.in_features = in_features
        self.count = 0
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        per_linear = weights is not None
        # The FP stream's terms in float32 (at most H's dtype): see the module docstring.
        self._fp_dtype = torch.float32 if dtype.itemsize >= 4 else dtype
        fp_terms = with_r and not per_linear
        self.R = torch.zeros_like(self.H, dtype=self._fp_dtype) if fp_terms else None
        self.D = torch.zeros_like(self.H, dtype=self._fp_dtype) if fp_terms else None
        self._W = [w.to(device=device, dtype=self._fp_dtype) for w in weights or ()]  # [N_i, K]
        self._WR = [torch.zeros_like(w) for w in self._W]
        self._wdw = [w.new_zeros(w.shape[0], dtype=torch.float64) for w in self._W]

    def add(self, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        """Add a batch of inputs [..., K]; `x_fp` holds the full-precision inputs of the same
        tokens."""
        x = x.reshape(-1, self.in_features)  # [T, K]
        t = x.shape[0]
        if t == 0:
            return
        total = self.count + t
        keep = self.count / total
        xh = x.to(self.H)
        # Running mean: H ← H·n/(n+t) + XᵀX/(n+t).
        self.H.mul_(keep).addmm_(xh.t(), xh, alpha=1.0 / total)
        del xh
        if self.R is not None or self._W:
            if x_fp is None:
                raise ValueError(
                    "this accumulator tracks R: pass the full-precision inputs x_fp too"
                )
            x32 = x.to(self._fp_dtype)
            dx = x32 - x_fp.reshape(-1, self.in_features).to(x32)  # [T, K]
            if self.R is not None and self.D is not None:
                self.R.mul_(keep).addmm_(dx.t(), x32, alpha=1.0 / total)
                self.D.mul_(keep).addmm_(dx.t(), dx, alpha=1.0 / total)
            for W, WR, wdw in zip(self._W, self._WR, self._wdw, strict=True):
                P = dx @ W.t()  # [T, N]: ΔX through the linear
                WR.mul_(keep).addmm_(P.t(), x32, alpha=1.0 / total)
                wdw.mul_(keep).add_(P.square().sum(0).double(), alpha=1.0 / total)
        self.count = total

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(H, R) in float32; H is symmetrized against rounding."""
        if self.count == 0:
            raise ValueError("no calibration tokens reached this layer: H is undefined")
        H = _symmetrized(self.H)
        R = None if self.R is None else self.R.float()
        return H, R

    def finalize_delta(self) -> torch.Tensor | None:
        """D = E[ΔX ΔXᵀ] in float32 (symmetrized), or None when the FP stream is not tracked."""
        if self.D is None:
            return None
        if self.count == 0:
            raise ValueError("no calibration tokens reached this layer: D is undefined")
        return _symmetrized(self.D)

    def take(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(H, R, D) as `finalize` and `finalize_delta` give them, releasing each accumulator as
        soon as its float32 result exists; the accumulator is empty afterwards.

        At K = 14336 the float64 H accumulator is 1.6 GiB and R and D 0.8 GiB each: holding them
        next to the results until the caller drops the accumulator would set the run's peak.
        """
        if self.count == 0:
            raise ValueError("no calibration tokens reached this layer: H is undefined")
        H = _symmetrized(self.H)
        self.H = self.H.new_empty(0)
        R = None if self.R is None else self.R.float()
        self.R = None
        D = None if self.D is None else _symmetrized(self.D)
        self.D, self.count = None, 0
        return H, R, D

    def take_feedback(self) -> list[RowFeedback] | None:
        """The `RowFeedback` of each of `weights` (in their order), or None without `weights`;
        the accumulator releases them."""
        if not self._W:
            return None
        out = [RowFeedback(WR, wdw) for WR, wdw in zip(self._WR, self._wdw, strict=True)]
        self._W, self._WR, self._wdw = [], [], []
        return out


def _symmetrized(A: torch.Tensor, block: int = 1 << 20) -> torch.Tensor:
    """(A + Aᵀ)/2 in float32, a block of about `block` elements (rows) at a time: elementwise the
    same values as the whole-matrix expression, without its two K×K temporaries in A's dtype."""
    out = torch.empty(A.shape, dtype=torch.float32, device=A.device)
    for r in row_slices(A.shape[0], A.shape[1], block):
        out[r] = 0.5 * (A[r] + A[:, r].t())
    return out


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    """Boolean [K]: inputs that were always zero (zero variance) in the calibration data."""
    return torch.diagonal(H) <= 0


def damp_hessian(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + λI [K, K] as one tensor, with λ = damp · mean(diag H) over the live inputs and dead
    inputs given a unit diagonal: `DampedHessian.of(H, damp).dense()`, for callers that want the
    matrix itself."""
    return DampedHessian.of(H, damp).dense()


@dataclass(frozen=True)
class DampedHessian:
    """The damped Hessian Hd = H + λI, λ = damp · mean(diag H) over the live inputs, read on demand
    instead of stored. Dead inputs (always zero in the calibration data) get zero rows and columns
    and a unit diagonal: they have no effect on the output, so their weight may be anything, and
    the unit diagonal keeps Hd positive definite and lets GPTQ quantize them by plain rounding.

    Hd differs from H only on its diagonal and on the dead inputs' rows and columns, so a K×K copy
    (0.8 GiB in float32 at K = 14336) is not needed.

    H [K, K] (undamped, not copied), dead [K] its dead inputs, diag_add [K] what the damping adds
    to the diagonal once dead rows and columns are zeroed (λ, or 1 + λ on a dead input).
    """

    H: torch.Tensor
    dead: torch.Tensor
    diag_add: torch.Tensor

    @classmethod
    def of(cls, H: torch.Tensor, damp: float) -> DampedHessian:
        dead = dead_columns(H)
        live = torch.diagonal(H)[~dead]
        lam = damp * (live.mean() if live.numel() else torch.tensor(1.0))
        one = torch.ones((), dtype=H.dtype, device=H.device)
        return cls(H, dead, torch.where(dead, one + lam, lam.to(H.dtype)))

    @property
    def shape(self) -> torch.Size:
        return self.H.shape

    @property
    def device(self) -> torch.device:
        return self.H.device

    def at(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """The entries Hd[i, j] for broadcastable index tensors (advanced indexing)."""
        out = torch.where(self.dead[i] | self.dead[j], 0.0, self.H[i, j])
        # Added only on the diagonal: x + 0 would turn a −0 off the diagonal into +0.
        return torch.where(i == j, out + self.diag_add[i], out)

    def diagonal(self) -> torch.Tensor:
        """diag(Hd) [K]."""
        return torch.where(self.dead, 0.0, torch.diagonal(self.H)) + self.diag_add

    def rows(self, rows: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Hd[rows][:, cols] (all columns when cols is None) for 1-D index tensors."""
        if cols is None:
            cols = torch.arange(self.H.shape[1], device=self.H.device)
        return self.at(rows[:, None], cols[None, :])

    def dense(self) -> torch.Tensor:
        """Hd [K, K] as one tensor."""
        return self.rows(torch.arange(self.H.shape[0], device=self.H.device))
