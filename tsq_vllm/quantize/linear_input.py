"""One linear input's moments, prepared once for every linear that reads it.

The permutation (act-order), the damping and the factorizations of the damped Hessian depend
only on the input, so q/k/v (and gate/up) share one `LinearInput`; `layer.quantize_weight_on`
quantizes each linear on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..core.gptq import HessianFactor
from ..core.hessian import DampedHessian, RowFeedback
from .scheme import LayerScheme

__all__ = ["LinearInput", "prepare_input"]


@dataclass
class LinearInput:
    """The moments of one linear input [K, K] in processing order, prepared once for every linear
    that reads it (q/k/v, gate/up): the permutation, the damping and the factorizations of Hd are
    the same for all of them.

    H, R, D permuted by `perm` (act-order; without it they are the caller's tensors, not copies);
    Hd the damped H (read from H on demand: no K×K copy); factor Hd's `HessianFactor`, which
    keeps GPTAQ's L for one solve per reader and U for one GPTQ pass per reader; with
    `gptq_order="act"` (static groups) the factor also holds GPTQ's column order (`factor.order`),
    while H, R, D and the groups stay in input order.
    `scheme` is the one it was prepared for (damp, act_order, gptq_order, precision, GPTAQ, GPTQ).
    feedbacks: the FP stream's terms per reading linear (`RowFeedback`, in input order) where they
    were accumulated through the weights instead of as R and D; `reader(name)` picks one linear's
    (`feedback`), which is what a linear is quantized on.
    """

    H: torch.Tensor
    R: torch.Tensor | None
    D: torch.Tensor | None
    Hd: DampedHessian
    perm: torch.Tensor
    factor: HessianFactor
    scheme: LayerScheme
    feedbacks: Mapping[str, RowFeedback] | None = None
    feedback: RowFeedback | None = None

    @property
    def with_fp(self) -> bool:
        """Whether the full-precision stream's terms are known (R and D, or per linear)."""
        return self.R is not None or self.feedbacks is not None

    @property
    def gptaq(self) -> bool:
        return self.scheme.gptaq_alpha > 0 and self.with_fp

    def reader(self, name: str) -> LinearInput:
        """The input as linear `name` reads it: with per-linear feedback, that linear's."""
        if self.feedbacks is None:
            return self
        return dataclasses.replace(self, feedback=self.feedbacks[name])


def prepare_input(
    H: torch.Tensor,
    scheme: LayerScheme,
    R: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    *,
    readers: int = 1,
    feedback: Mapping[str, RowFeedback] | None = None,
) -> LinearInput:
    """Check the moments' shapes and put them in processing order, for `readers` linears.

    `feedback` (per reading linear, by name) stands in for R and D: see `RowFeedback`."""
    s = scheme
    if readers < 1:
        raise ValueError(f"readers={readers}: an input is prepared for at least one linear")
    K = H.shape[-1]
    if H.shape != (K, K):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected a square [K, K]")
    for name, M in (("R", R), ("D", D)):
        if M is not None and M.shape != (K, K):
            raise ValueError(f"{name} has shape {tuple(M.shape)}, expected [{K}, {K}]")
    if feedback is not None:
        if R is not None or D is not None:
            raise ValueError("pass the FP stream's terms as R and D or per linear, not both")
        for name, fb in feedback.items():
            if fb.WR.ndim != 2 or fb.WR.shape[1] != K or fb.w_d_w.shape != fb.WR.shape[:1]:
                raise ValueError(
                    f"{name}: feedback WR {tuple(fb.WR.shape)} and wᵀDw {tuple(fb.w_d_w.shape)} "
                    f"do not fit an [N, {K}] weight"
                )
    if s.energy_match and R is not None and D is None:
        raise ValueError(
            "energy_match needs D = E[ΔX ΔXᵀ] when R is given: the FP output energy depends on it"
        )
    H = H.float()
    R = None if R is None else R.float()
    D = None if D is None else D.float()
    # Act-order: columns by decreasing H_jj, dead inputs (H_jj = 0) last.
    static_act = s.gptq and s.gptq_order == "act" and not s.act_order
    act = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    if s.act_order:
        # Work in processing order, where groups are contiguous column ranges.
        perm = act
        rows, cols = perm[:, None], perm  # one gather: no [perm]-then-[:, perm] intermediate
        H = H[rows, cols]
        R = None if R is None else R[rows, cols]
        D = None if D is None else D[rows, cols]
    else:
        perm = torch.arange(K, device=H.device)  # nothing writes to them in place: no copies
    Hd = DampedHessian.of(H, s.damp)
    gptaq = s.gptaq_alpha > 0 and (R is not None or feedback is not None)
    # GPTQ asks for U once per linear; GPTQT twice when its second pass reuses a float64 U.
    second = s.method == "gptqt" and s.requantize and s.math_dtype == torch.float64
    uses = readers * (2 if second else 1) if s.gptq else 0
    # Static groups: only GPTQ's loop runs in act-order, so only its factor is permuted.
    order = act if static_act else None
    factor = HessianFactor(Hd, s.math_dtype, solves=readers if gptaq else 0, uses=uses, order=order)
    return LinearInput(H, R, D, Hd, perm, factor, s, feedbacks=feedback)
