"""The GPTQT pipeline for one weight: critical points, a second GPTQ pass, scale re-exploration.

Inputs: W [N, K], H = E[X Xᵀ] [K, K] (R = E[(X − X̃) Xᵀ] optional), and the first, b₀-bit GPTQ
pass: its grid (scale s, zero z [N, n_g]) and codes x [N, K]. Steps:

 1. Critical points (`bcq.search_levels`): per (row, group) the admissible k-bit level set on
    the integer axis minimizing Σ_j H_jj (x_j − ℓ*(x_j))².
 2. Requantization (on by default; the paper leaves the order open). Mapping x → ℓ*(x) after
    GPTQ leaves the mapping error uncompensated, so a second GPTQ pass over W uses the
    two-step quantizer with the level sets frozen:

      q(w) = s (ℓ*(clamp(round(w / s) + z, 0, M)) − z)      linear to b₀ bits, then the level map

    and GPTQ's error feedback spreads each column's total error, mapping included, over the
    columns not yet quantized. Every code is still a level of its group's set. Off: x' = ℓ*(x).
 3. Scale re-exploration (`reexplore_scales`): with the codes frozen (u = x' − z), each group's
    scale is multiplied by γ from a grid around 1 (0.8 … 1.2 and always 1), scored by the
    stage-1 loss (q − w)ᵀ H_gg (q − w) on the g×g diagonal block H_gg. With frozen codes that loss
    is a σ² − 2 b σ + c₀ in σ = γ s (a = uᵀH_gg u, b = uᵀH_gg w), so a grid point costs O(1)
    once a and b are formed. Then, optionally, stage 2 (`refine_scales`: the full H and R,
    coordinate descent) refines those scales, levels and codes frozen. The block loss ignores
    cross-group terms and stage 2 is monotone only from its own start, so a last per-row check
    keeps the un-explored scales of every row whose layer loss did not improve: re-exploration
    is never worse than none on the layer loss Σ_n (q_n − w_n)ᵀH(q_n − w_n) + 2 w_nᵀR(q_n − w_n).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .bcq import (
    BCQWeight,
    check_bits,
    code_histogram,
    level_candidates,
    map_codes,
    search_levels,
)
from .gptq import HessianFactor, inverse_rows
from .grid import Grid
from .hessian import DampedHessian
from .stage2 import ScaleSystem, layer_objective, refine_system, scale_system

__all__ = [
    "GPTQTSettings",
    "Reexplore",
    "gptq_quantize_levels",
    "explore_multipliers",
    "gptqt_convert",
    "gptqt_levels",
    "reexplore_scales",
    "settle_scales",
]


@dataclass(frozen=True)
class Reexplore:
    """Scale re-exploration: multipliers γ = linspace(lowest, highest, points) ∪ {1}, then stage
    2."""

    lowest: float = 0.8
    highest: float = 1.2
    points: int = 41
    stage2: bool = True
    stage2_sweeps: int = 20
    box: float | None = None  # stage 2's scale box around the grid-searched scales (None: none)

    def __post_init__(self) -> None:
        if not 0 < self.lowest <= 1 <= self.highest:
            raise ValueError(
                f"re-exploration range [{self.lowest}, {self.highest}] must satisfy 0 < lowest <= "
                "1 <= highest"
            )
        if self.box is not None and not self.box >= 1.0:
            raise ValueError(f"re-exploration box {self.box} must be at least 1, or None")
        if self.points < 1 or self.stage2_sweeps < 1:
            raise ValueError(
                f"re-exploration needs points >= 1 and stage2_sweeps >= 1, got {self.points}, "
                f"{self.stage2_sweeps}"
            )

    def multipliers(self) -> torch.Tensor:
        grid = torch.linspace(self.lowest, self.highest, self.points, dtype=torch.float64)
        # Rounding merges linspace's near-1 point with the exact 1 that must be a candidate.
        return torch.cat([grid, torch.ones(1, dtype=torch.float64)]).round(decimals=12).unique()


def _diagonal_blocks(H: torch.Tensor, group_size: int) -> torch.Tensor:
    n_g = H.shape[0] // group_size
    idx = torch.arange(n_g * group_size).reshape(n_g, group_size)
    return H[idx[:, :, None], idx[:, None, :]]  # [n_g, g, g]


def _row_losses(system: ScaleSystem, s: torch.Tensor) -> torch.Tensor:
    """Per-row layer loss sᵀAs − 2bᵀs + c [N] from stage 2's system (the paper's eq. (7), α = 1)."""
    return system.row_objective(s.double())


def reexplore_scales(
    W: torch.Tensor,
    U: torch.Tensor,
    scale: torch.Tensor,
    H: torch.Tensor,
    group_size: int,
    options: Reexplore,
    R: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Re-explored scales [N, n_g] for frozen integer weights U [N, K] = codes − zeros.

    Returns the scales and stats: "loss_mapped" and "loss" (the layer loss with H and R before and
    after), "rows_reverted" (rows that kept their scales because nothing improved their loss).
    The γ grid and the system are per row (`explore_multipliers`, `scale_system`); stage 2's
    sweeps and the stats read all rows (`settle_scales`).
    """
    best = explore_multipliers(W, U, scale, H, group_size, options)
    return settle_scales(scale_system(W, U, H, R, group_size), scale, best, options)


def explore_multipliers(
    W: torch.Tensor,
    U: torch.Tensor,
    scale: torch.Tensor,
    H: torch.Tensor,
    group_size: int,
    options: Reexplore,
) -> torch.Tensor:
    """Each group's best scale γ·s [N, n_g] float64 on the γ grid, by its diagonal block's loss."""
    N, K = W.shape
    n_g = K // group_size
    Wg = W.double().reshape(N, n_g, group_size).transpose(0, 1)  # [n_g, N, g]
    Ug = U.double().reshape(N, n_g, group_size).transpose(0, 1)
    Hb = _diagonal_blocks(H.double(), group_size)
    HU = torch.bmm(Ug, Hb)  # H_gg is symmetric, so rows of U H_gg serve both a and b
    a = (Ug * HU).sum(-1).t()  # [N, n_g]
    b = (Wg * HU).sum(-1).t()
    s0 = scale.double()
    sigma = options.multipliers()[:, None, None] * s0  # [P, N, n_g]
    block_loss = a * sigma.square() - 2 * b * sigma  # c₀ = wᵀH_gg w is the same for every γ
    low, arg = block_loss.min(0)
    # Move only on a strict improvement: groups whose codes sit at the zero point keep s.
    unit = int((options.multipliers() == 1).nonzero())
    return torch.where(low < block_loss[unit], sigma.gather(0, arg[None])[0], s0)


def settle_scales(
    system: ScaleSystem, scale: torch.Tensor, best: torch.Tensor, options: Reexplore
) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage 2 from the explored scales `best` on `system` (all rows), then every row whose layer
    loss did not improve on `scale` keeps it; the scales [N, n_g] float32 and the stats."""
    s0 = scale.double()
    if options.stage2:
        best = refine_system(
            system, best.float(), box=options.box, max_sweeps=options.stage2_sweeps
        ).scale.double()
    before, after = _row_losses(system, s0), _row_losses(system, best)
    worse = after > before
    best = torch.where(worse[:, None], s0, best)
    stats = {
        "loss_mapped": float(before.sum()),
        "loss": float(torch.where(worse, before, after).sum()),
        "rows_reverted": float(worse.sum()),
    }
    return best.float(), stats


@dataclass(frozen=True)
class GPTQTSettings:
    """k = `bits` of binary coding; requantize: step 2 above; reexplore None skips step 3."""

    bits: int = 3
    requantize: bool = True
    reexplore: Reexplore | None = field(default_factory=Reexplore)
    block_size: int = 128

    def __post_init__(self) -> None:
        if self.bits < 1 or self.block_size < 1:
            raise ValueError(
                f"GPTQT needs bits >= 1 and block_size >= 1, got {self.bits}, {self.block_size}"
            )


def gptq_quantize_levels(
    W: torch.Tensor,
    H: torch.Tensor | DampedHessian | HessianFactor,
    grid: Grid,
    tables: torch.Tensor,
    group_size: int,
    *,
    block_size: int = 128,
) -> torch.Tensor:
    """Codes [N, K] of GPTQ with the two-step quantizer: b₀-bit grid, then tables [N, n_g, M+1].

    The column loop of `core.gptq.gptq_quantize` (H damped or its `HessianFactor`, lazy block
    updates) with its rounding replaced by table lookup; `tables[n, g, x]` is the level that
    code x of group g maps to.
    """
    Hinv = (H if isinstance(H, HessianFactor) else HessianFactor(H)).inverse_factor(None)
    W = W.float().clone()  # after U, like `gptq.gptq_quantize`
    N, K = W.shape
    codes = torch.zeros(N, K, dtype=torch.int64)
    scale, zero = grid.scale.float(), grid.zero.float()
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = inverse_rows(Hinv, i1, i2)  # [B, K] float32
        Hinv1 = U1[:, i1:i2]
        for i in range(i2 - i1):
            g = (i1 + i) // group_size
            s, z, w = scale[:, g], zero[:, g], W1[:, i]
            x = torch.clamp(torch.round(w / s) + z, 0, grid.maxq).long()
            c = tables[:, g].gather(1, x[:, None])[:, 0]
            codes[:, i1 + i] = c
            err = (w - s * (c - z)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U1[:, i2:]
    return codes


def gptqt_convert(
    W: torch.Tensor,
    H: torch.Tensor,
    codes: torch.Tensor,
    grid: Grid,
    group_size: int,
    settings: GPTQTSettings,
    *,
    R: torch.Tensor | None = None,
    H_damped: torch.Tensor | DampedHessian | HessianFactor | None = None,
    gptq_target: torch.Tensor | None = None,
) -> BCQWeight:
    """Convert the b₀-bit GPTQ pass (codes [N, K] on `grid`, b₀ = grid.bits) of W [N, K] to BCQ:
    steps 1 and 2 (`gptqt_levels`, whose doc describes the arguments), then re-exploration
    (step 3) or, without it, the layer loss. stats: "map_error", "loss", and with
    re-exploration "loss_mapped" and "rows_reverted" (see `reexplore_scales`).
    """
    bw = gptqt_levels(
        W, H, codes, grid, group_size, settings, H_damped=H_damped, gptq_target=gptq_target
    )  # re-exploration then scores against W, with H (and R) whole
    H = H.float()
    U = (bw.codes - grid.zero.repeat_interleave(group_size, dim=1)).float()
    if settings.reexplore is not None:
        bw.scale, more = reexplore_scales(
            W.float(), U, bw.scale, H, group_size, settings.reexplore, R=R
        )
        bw.stats.update(more)
    else:
        bw.stats["loss"] = layer_objective(
            W, bw.scale.repeat_interleave(group_size, dim=1) * U, H, R
        )
    return bw


def gptqt_levels(
    W: torch.Tensor,
    H: torch.Tensor,
    codes: torch.Tensor,
    grid: Grid,
    group_size: int,
    settings: GPTQTSettings,
    *,
    H_damped: torch.Tensor | DampedHessian | HessianFactor | None = None,
    gptq_target: torch.Tensor | None = None,
) -> BCQWeight:
    """Steps 1 and 2 for the b₀-bit pass (codes [N, K] on `grid`) of W [N, K]: the BCQ weight on
    the grid's scales, stats "map_error" (Σ H_jj (x_j − ℓ*(x_j))² of the first pass). Per row,
    like the first pass: a wide W may run in row blocks.

    H [K, K] is the objective's Hessian: its diagonal weights the critical-point search. H_damped
    (default H) drives the second GPTQ pass and must be positive definite; it may be the first
    pass's float64 `HessianFactor`, whose U that pass then reuses instead of factorizing again;
    gptq_target (default W) is the weight that pass quantizes (a GPTAQ-style target).
    """
    bits = settings.bits
    check_bits(bits, grid.bits)
    N, K = W.shape
    if K % group_size or H.shape != (K, K) or codes.shape != (N, K):
        raise ValueError(
            f"gptqt_convert needs W [N, K] with K a multiple of group_size={group_size}, H [K, K] "
            f"and codes [N, K]; got W {tuple(W.shape)}, H {tuple(H.shape)}, codes "
            f"{tuple(codes.shape)}"
        )
    if grid.scale.shape != (N, K // group_size) or grid.zero.shape != grid.scale.shape:
        raise ValueError(
            f"grid scale/zero have shape {tuple(grid.scale.shape)}, expected [{N}, "
            f"{K // group_size}]"
        )
    if codes.min() < 0 or codes.max() > grid.maxq:
        raise ValueError(
            f"codes span [{int(codes.min())}, {int(codes.max())}], outside [0, {grid.maxq}] for "
            f"b0={grid.bits}"
        )
    H = H.float()
    cand = level_candidates(bits, grid.bits)
    best, cost = search_levels(
        code_histogram(codes, torch.diagonal(H).clamp(min=0), group_size, grid.bits), cand
    )
    if settings.requantize:
        Hd = H if H_damped is None else H_damped
        Hd = Hd.float() if isinstance(Hd, torch.Tensor) else Hd
        target = W if gptq_target is None else gptq_target
        codes = gptq_quantize_levels(
            target, Hd, grid, cand.mapped[best], group_size, block_size=settings.block_size
        )
    new_codes, signs = map_codes(codes, best, cand, group_size)  # the identity on requantized codes
    stats = {"map_error": float(cost.double().sum())}
    return BCQWeight(
        new_codes,
        grid.scale.float(),
        grid.zero.long(),
        cand.low[best],
        cand.steps[best],
        signs,
        grid.bits,
        group_size,
        stats,
    )
