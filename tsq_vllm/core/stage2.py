"""Stage 2: refine the group scales by coordinate descent with the integer codes frozen.

For one output row w [K] with codes frozen, u_i = c_i − z_i on group i and q = Σ_i s_i u_i, the
paper's eq. (7) is the expected squared error of the output against the full-precision model's,

  E‖qᵀX − wᵀX̃‖² = (q − w)ᵀ H (q − w) + 2 wᵀ R (q − w) + wᵀ D w
                  H = E[X Xᵀ],  R = E[ΔX Xᵀ],  D = E[ΔX ΔXᵀ],  ΔX = X − X̃ (R = D = 0 in layer 1)

a quadratic in the n_g scales. We minimize a damped version, with the error-feedback term
weighted by α ∈ [0, 1] (α = 1 is the paper's eq. (7), α = 0 ignores the FP stream):

  L_α(s) = sᵀ A s − 2 bᵀ s + const,   A_ij = u_iᵀ H_ij u_j,   b_i = u_iᵀ [(H − α Rᵀ) w]_i

Coordinate descent sets ∂L/∂s_i = 0 for one group at a time:

  s_i ← (b_i − Σ_{j≠i} A_ij s_j) / A_ii
      = s_i + [u_iᵀ H_{i,:}(w − q) − α wᵀ R_{:,i} u_i] / (u_iᵀ H_ii u_i)

which is the paper's update (9) at α = 1. With a box s_i ∈ [s0_i/β, β·s0_i] around the scale the
refinement started from, the step is the clamp of that minimizer into the interval: the exact
minimizer of a convex 1-D quadratic on an interval, so L still never increases, and every scale
keeps the sign of s0 (> 0: the paper's constraint s > 0, which the unbounded update can violate).

Instead of keeping (w − q)ᵀH current after every group (an [N, K] rank-g update, O(N·K²) per
sweep), we form the Gram matrices A once, for all rows, in n_g GEMMs costing O(N·K²) together,
after which every sweep costs only O(N·n_g²): the iterates are the same, sweeps become almost
free, and the objective is available exactly at every sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .hessian import RowFeedback

__all__ = [
    "OutputStats",
    "ScaleSystem",
    "Stage2Result",
    "energy_match",
    "layer_objective",
    "output_stats",
    "refine_scales",
    "refine_system",
    "scale_system",
]


@dataclass(frozen=True)
class OutputStats:
    """Layer-wide sums over output rows of the eq. (7) error and the output energies.

    loss       E‖QX − WX̃‖²  (the true eq. (7), constant included)
    fp_energy  E‖WX̃‖² = Σ wᵀ E[X̃X̃ᵀ] w,  E[X̃X̃ᵀ] = H − R − Rᵀ + D
    q_energy   E‖QX‖² = Σ qᵀ H q
    Without an FP stream (R = D = None) X̃ is taken to be X.
    """

    loss: float
    fp_energy: float
    q_energy: float

    def __add__(self, other: OutputStats) -> OutputStats:
        """The stats of two disjoint sets of rows together: every field is a sum over rows."""
        return OutputStats(
            self.loss + other.loss,
            self.fp_energy + other.fp_energy,
            self.q_energy + other.q_energy,
        )

    @property
    def rel_error(self) -> float:
        return self.loss / self.fp_energy if self.fp_energy > 0 else 0.0

    @property
    def energy_ratio(self) -> float:
        return self.q_energy / self.fp_energy if self.fp_energy > 0 else 1.0


_WIDEN_BYTES = 1 << 26  # the float64 copy of A's rows that `ScaleSystem.q_energy` makes at once


@dataclass
class ScaleSystem:
    """Per row of W: the quadratic in the scales, split into its H, R and D parts.

    A [N, n_g, n_g] (float32: its entries are float32 GEMM results, read in float64 wherever
    they are used, so it holds exactly the float64 system at half the memory: 0.8 GiB instead of
    1.6 at Llama-3-8B's down_proj), b_h = u_iᵀ(Hw)_i and b_r = u_iᵀ(Rᵀw)_i [N, n_g], w_h_w =
    wᵀHw, w_r_w = wᵀRw, w_d_w = wᵀDw [N] (float64); the R and D parts are None when there is no
    FP stream.
    """

    A: torch.Tensor
    b_h: torch.Tensor
    w_h_w: torch.Tensor
    b_r: torch.Tensor | None = None
    w_r_w: torch.Tensor | None = None
    w_d_w: torch.Tensor | None = None

    @staticmethod
    def cat(parts: list[ScaleSystem]) -> ScaleSystem:
        """The system of all rows of `parts` (disjoint row blocks, in order): every field is per
        row, so the blocks' systems stack; one part is returned as it is."""
        if len(parts) == 1:
            return parts[0]

        def rows(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if ts[0] is None else torch.cat([t for t in ts if t is not None])

        return ScaleSystem(
            A=torch.cat([p.A for p in parts]),
            b_h=torch.cat([p.b_h for p in parts]),
            w_h_w=torch.cat([p.w_h_w for p in parts]),
            b_r=rows([p.b_r for p in parts]),
            w_r_w=rows([p.w_r_w for p in parts]),
            w_d_w=rows([p.w_d_w for p in parts]),
        )

    def b(self, alpha: float = 1.0) -> torch.Tensor:
        return self.b_h if self.b_r is None else self.b_h - alpha * self.b_r

    def q_energy(self, s: torch.Tensor) -> torch.Tensor:
        """qᵀHq per row [N], for float64 scales s [N, n_g]; A is widened a block of rows at a
        time (one block when it is under 64 MiB in float64)."""
        n_g = self.A.shape[-1]
        rows = max(1, _WIDEN_BYTES // (8 * n_g * n_g))
        As = torch.cat([
            torch.einsum("nij,nj->ni", self.A[r : r + rows].double(), s[r : r + rows])
            for r in range(0, self.A.shape[0], rows)
        ])  # fmt: skip
        return (s * As).sum(-1)

    def fp_energy(self) -> torch.Tensor:
        """wᵀE[X̃X̃ᵀ]w per row [N] (needs D when R is present)."""
        if self.w_r_w is None:
            return self.w_h_w
        if self.w_d_w is None:
            raise ValueError("the FP output energy needs D = E[ΔX ΔXᵀ]: pass D to scale_system")
        return self.w_h_w - 2 * self.w_r_w + self.w_d_w

    def row_objective(self, s: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """L_α(s) per row [N], without the constant wᵀDw."""
        c = self.w_h_w if self.w_r_w is None else self.w_h_w - 2 * alpha * self.w_r_w
        return self.q_energy(s) - 2 * (self.b(alpha) * s).sum(-1) + c

    def objective(self, s: torch.Tensor, alpha: float = 1.0) -> float:
        """L_α(s) summed over rows, without the constant wᵀDw (α = 1: `layer_objective`)."""
        return float(self.row_objective(s, alpha).sum())

    def output_stats(self, s: torch.Tensor) -> OutputStats:
        """The true eq. (7) and the energies at scales s [N, n_g]; costs O(N·n_g²)."""
        s = s.double()
        loss = self.objective(s, 1.0) + (0.0 if self.w_d_w is None else float(self.w_d_w.sum()))
        return OutputStats(loss, float(self.fp_energy().sum()), float(self.q_energy(s).sum()))


@dataclass
class Stage2Result:
    scale: torch.Tensor  # [N, n_g]
    objective: list[float] = field(
        default_factory=list
    )  # L_α summed over rows, before sweep 1 and after each sweep
    at_bound: int = 0  # scales that ended on an edge of the box


def _grouped_sum(x: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = x.shape
    return x.reshape(N, K // group_size, group_size).sum(-1)


def scale_system(
    W: torch.Tensor,
    U: torch.Tensor,
    H: torch.Tensor,
    R: torch.Tensor | None,
    group_size: int,
    D: torch.Tensor | None = None,
    row_chunk: int = 1024,
    *,
    feedback: RowFeedback | None = None,
) -> ScaleSystem:
    """The quadratic L(s) per row, for W [N, K], U [N, K] = codes − zeros, H, R and D [K, K].

    `feedback` (W R and wᵀDw of these rows, accumulated per linear) stands in for R and D.
    The GEMMs run in float32 (U holds small integers, so A is accurate to float32 rounding); the
    sweeps run in float64, and b and the energies are stored in it.
    """
    N, K = W.shape
    n_g = K // group_size
    W, U, H = W.float(), U.float(), H.float()
    WH = W @ H  # [N, K]: rows are (H w)ᵀ
    sys = ScaleSystem(
        A=torch.empty(0),
        b_h=_grouped_sum(U * WH, group_size).double(),
        w_h_w=(W * WH).sum(-1).double(),
    )
    if feedback is not None:
        WR = feedback.WR.float()
        sys.b_r = _grouped_sum(U * WR, group_size).double()
        sys.w_r_w = (W * WR).sum(-1).double()
        sys.w_d_w = feedback.w_d_w.double()
    elif R is not None:
        WR = W @ R.float()  # rows are (Rᵀ w)ᵀ
        sys.b_r = _grouped_sum(U * WR, group_size).double()
        sys.w_r_w = (W * WR).sum(-1).double()
        if D is not None:
            sys.w_d_w = (W * (W @ D.float())).sum(-1).double()
    A = torch.empty(N, n_g, n_g, dtype=torch.float32, device=W.device)  # see `ScaleSystem`
    for r in range(0, N, row_chunk):  # row chunks keep V in cache: about 2x faster than whole rows
        Uc = U[r : r + row_chunk]
        for j in range(n_g):
            # A is symmetric: fill column j and row j from groups j.. only.
            lo = j * group_size
            V = Uc[:, lo : lo + group_size] @ H[lo : lo + group_size, lo:]  # [n, K - lo]
            col = (Uc[:, lo:] * V).reshape(-1, n_g - j, group_size).sum(-1)  # [n, n_g - j]
            A[r : r + row_chunk, j:, j] = col
            A[r : r + row_chunk, j, j:] = col
    sys.A = A
    return sys


def refine_scales(
    W: torch.Tensor,
    U: torch.Tensor,
    scale: torch.Tensor,
    H: torch.Tensor,
    R: torch.Tensor | None,
    group_size: int,
    *,
    alpha: float = 1.0,
    box: float | None = None,
    max_sweeps: int = 20,
    rtol: float = 1e-6,
    system: ScaleSystem | None = None,
) -> Stage2Result:
    """Coordinate descent on the scales [N, n_g] from `scale`, codes frozen (U = codes − zeros).

    alpha weights the error-feedback term R (1: the paper's eq. (7)). box = β keeps every scale in
    [s0/β, β·s0] with s0 = `scale`; None leaves the scales unbounded. Stops after `max_sweeps` or
    when a sweep lowers L_α by less than `rtol`·|L_α|. Groups whose codes are all at the zero point
    (A_ii = 0) have no effect on q and keep their scale.
    """
    sys = system if system is not None else scale_system(W, U, H, R, group_size)
    return refine_system(sys, scale, alpha=alpha, box=box, max_sweeps=max_sweeps, rtol=rtol)


def refine_system(
    sys: ScaleSystem,
    scale: torch.Tensor,
    *,
    alpha: float = 1.0,
    box: float | None = None,
    max_sweeps: int = 20,
    rtol: float = 1e-6,
) -> Stage2Result:
    """`refine_scales` on a system already formed: the sweeps need nothing of W, U, H or R.

    The stopping rule reads the objective summed over all rows of `sys`, so the sweeps are not
    row-independent: a caller that forms the system in row blocks stacks them (`ScaleSystem.cat`)
    and sweeps once.
    """
    if box is not None and not box >= 1.0:
        raise ValueError(
            f"scale box {box} must be at least 1 (the interval [s0/box, box*s0]), or None for no "
            "box"
        )
    A, b = sys.A, sys.b(alpha)
    s = scale.double().clone()
    if box is not None:
        s0 = s.clone()
        lo, hi = torch.minimum(s0 / box, s0 * box), torch.maximum(s0 / box, s0 * box)
    n_g = s.shape[1]
    diag = torch.diagonal(A, dim1=1, dim2=2)  # [N, n_g]
    live = diag > 0
    safe_diag = torch.where(live, diag, torch.ones_like(diag))
    result = Stage2Result(scale=s, objective=[sys.objective(s, alpha)])
    for _ in range(max_sweeps):
        for i in range(n_g):
            # Σ_{j≠i} A_ij s_j = (A s)_i − A_ii s_i
            rest = (A[:, i, :] * s).sum(-1) - diag[:, i] * s[:, i]
            step = (b[:, i] - rest) / safe_diag[:, i]
            if box is not None:
                step = torch.clamp(step, lo[:, i], hi[:, i])
            s[:, i] = torch.where(live[:, i], step, s[:, i])
        result.objective.append(sys.objective(s, alpha))
        before, after = result.objective[-2], result.objective[-1]
        if before - after <= rtol * abs(before):
            break
    if box is not None:
        result.at_bound = int((live & ((s <= lo) | (s >= hi))).sum())
    result.scale = s.float()
    return result


def energy_match(system: ScaleSystem, scale: torch.Tensor) -> torch.Tensor:
    """Scales [N, n_g] with each row multiplied by γ so that qᵀHq equals the FP energy wᵀE[X̃X̃ᵀ]w.

    Rows with no quantized or no FP energy keep their scales. γ > 0, so signs are kept.
    """
    q = system.q_energy(scale.double())
    fp = system.fp_energy()
    ok = (q > 0) & (fp > 0)
    gamma = torch.where(
        ok, (fp.clamp(min=0) / torch.where(ok, q, torch.ones_like(q))).sqrt(), torch.ones_like(q)
    )
    return (scale.double() * gamma[:, None]).to(scale.dtype)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())


def output_stats(
    W: torch.Tensor,
    Q: torch.Tensor,
    H: torch.Tensor,
    R: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    *,
    err_h: float | None = None,
    feedback: RowFeedback | None = None,
) -> OutputStats:
    """`OutputStats` of the quantized weight Q [N, K] against W [N, K], directly from H, R, D
    (or `feedback`, W's rows' W R and wᵀDw, in place of R and D).

    err_h: Σ (q − w)ᵀ H (q − w) when already known (GPTQ's own error sum), which saves the Q·H GEMM.
    The GEMMs run in float32 (they are only for statistics), the reductions in float64.
    """
    W, Q, H = W.float(), Q.float(), H.float()
    dQ = Q - W
    WH = W @ H
    w_h_w, w_h_q = _dot(W, WH), _dot(Q, WH)
    if err_h is None:
        err_h = _dot(dQ @ H, dQ)
    q_energy = err_h + 2 * w_h_q - w_h_w  # (q − w)ᵀH(q − w) = qᵀHq − 2wᵀHq + wᵀHw
    if feedback is not None:
        WR, w_d_w = feedback.WR.float(), float(feedback.w_d_w.double().sum())
    elif R is None:
        return OutputStats(err_h, w_h_w, q_energy)
    elif D is None:
        raise ValueError("the true eq. (7) needs D = E[ΔX ΔXᵀ] when R is given")
    else:
        WR, w_d_w = W @ R.float(), _dot(W, W @ D.float())
    w_r_w, w_r_dq = _dot(W, WR), _dot(WR, dQ)  # wᵀRw, wᵀR(q − w)
    return OutputStats(err_h + 2 * w_r_dq + w_d_w, w_h_w - 2 * w_r_w + w_d_w, q_energy)


def layer_objective(
    W: torch.Tensor,
    Q: torch.Tensor,
    H: torch.Tensor,
    R: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> float:
    """Σ over rows of (q − w)ᵀ H (q − w) + 2 wᵀ R (q − w): the paper's eq. (7) without its
    constant."""
    W, Q, H = W.to(dtype), Q.to(dtype), H.to(dtype)
    D = Q - W  # [N, K]
    loss = float(((D @ H) * D).sum())
    if R is not None:
        loss += 2 * float(((W @ R.to(dtype)) * D).sum())
    return loss
