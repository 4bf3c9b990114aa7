"""The factorization code as it was before `HessianFactor`: the oracle for bit-identity tests.

Two Choleskys of the same damped H per linear (one in GPTAQ's target, one in GPTQ's factor),
out-of-place torch ops, whole-matrix symmetrization of the accumulators. `OldFactor` serves the
library's `HessianFactor` interface from these formulas, so a test can run the library's pipeline
with the old arithmetic (monkeypatched in) and compare bytes.
"""

from __future__ import annotations

import torch

from tsq_vllm.core import DampedHessian, HessianAccumulator, HessianFactor


def old_inverse_hessian_factor(H: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(H.to(dtype))
    assert not int(info)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True).float()


def old_asymmetric_target(
    W: torch.Tensor, H: torch.Tensor, R: torch.Tensor, alpha: float, dtype: torch.dtype
) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(H.to(dtype))
    assert not int(info)
    WR = W.to(dtype) @ R.to(dtype)
    return (W.to(dtype) - alpha * torch.cholesky_solve(WR.t(), L).t()).to(W.dtype)


def old_moments(acc: HessianAccumulator):
    """(H, R, D) as `finalize` and `finalize_delta` computed them."""
    H = (0.5 * (acc.H + acc.H.t())).float()
    R = None if acc.R is None else acc.R.float()
    D = None if acc.D is None else (0.5 * (acc.D + acc.D.t())).float()
    return H, R, D


def _dense(Hd) -> torch.Tensor:
    """The damped Hessian as one tensor, as the old code held it."""
    return Hd.dense() if isinstance(Hd, DampedHessian) else Hd


class OldFactor(HessianFactor):
    """Every request recomputed from Hd with the old formulas (nothing shared, nothing in place),
    on P Hd Pᵀ when the factor has a GPTQ column order."""

    def _ordered(self) -> torch.Tensor:
        o, Hd = self.order, _dense(self.Hd)
        return Hd if o is None else Hd[o][:, o]

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        L, info = torch.linalg.cholesky_ex(self._ordered().to(self.dtype))
        assert not int(info)
        if self.order is None:
            return torch.cholesky_solve(B, L)
        X = torch.empty_like(B)
        X[self.order] = torch.cholesky_solve(B[self.order], L)
        return X

    def inverse_factor(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        return old_inverse_hessian_factor(self._ordered(), self.dtype)  # float32 either way


def old_target_from_factor(W, factor, R, alpha, dtype=torch.float64, *, WR=None):
    """`asymmetric_target`'s call in `prepare_layer`, computed the old way from the factor's Hd
    (in the factor's column order, then back: the order its solve runs in); WR (per-linear
    feedback) in place of W R."""
    o = factor.order
    dtype = factor.dtype
    if o is None and WR is None:
        return old_asymmetric_target(W, _dense(factor.Hd), R, alpha, factor.dtype)
    o = torch.arange(W.shape[1]) if o is None else o
    L, info = torch.linalg.cholesky_ex(_dense(factor.Hd)[o][:, o].to(dtype))
    assert not int(info)
    if WR is None:
        WR = W.to(dtype) @ R.to(dtype)  # in input order, as asymmetric_target forms it
    WR = WR.to(dtype)
    X = torch.empty_like(WR.t())
    X[o] = torch.cholesky_solve(WR.t()[o], L)
    return (W.to(dtype) - alpha * X.t()).to(W.dtype)


def use_old_factorizations(monkeypatch) -> None:
    """Make `quantize.layer` (and so the pipeline) and GPTQT's second pass run the old
    arithmetic."""
    from tsq_vllm.core import gptqt
    from tsq_vllm.quantize import layer, linear_input

    monkeypatch.setattr(linear_input, "HessianFactor", OldFactor)
    monkeypatch.setattr(gptqt, "HessianFactor", OldFactor)
    monkeypatch.setattr(layer, "asymmetric_target", old_target_from_factor)
