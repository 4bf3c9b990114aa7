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

from .blocks import row_slices
from .grid import Grid
from .hessian import DampedHessian
from .pages import release_zero_triangle

__all__ = [
    "HessianFactor",
    "asymmetric_target",
    "gptq_quantize",
    "inverse_hessian_factor",
    "inverse_rows",
]

_NOT_PD = (
    "H is not positive definite even after damping: raise damp (e.g. 0.05) or use more "
    "calibration tokens"
)


class HessianFactor:
    """The factorizations of one damped Hessian Hd [K, K], each computed once and shared.

    GPTAQ's target needs L (Hd = L Lᵀ) for one solve per linear, GPTQ needs U, the upper Cholesky
    factor of Hd⁻¹ (Hd⁻¹ = Uᵀ U). Both come from a single Cholesky of Hd: L, then
    Hd⁻¹ = cholesky_inverse(L), then U; linears that read the same input (q/k/v) share one factor.

    Memory: at K = 14336 (Llama-3-8B's down_proj) one float64 K×K matrix is 1.6 GiB, so the
    chain runs in one column-major buffer overwritten in place (Hd → L → Hd⁻¹ → U), and the pages
    of the zero triangle beside L and beside U are given back (`pages.release_zero_triangle`:
    half the buffer, for as long as L or U lives). torch's
    out= variants of these three ops alias their input safely and give the same bits as the
    out-of-place ops (tests/core/test_gptq.py compares them). L is computed on first use, so a
    caller can finish its other float64 work (GPTAQ's W R) before L exists.

    solves: how many `solve` calls to keep L for (GPTAQ: one per linear reading this input); uses:
    how many times U will be asked for (GPTQ passes), after which it is released, so the last
    linear's stage 2 runs without it. U asked for before the last solve is computed from a copy
    of L. Counting too high only keeps a factor longer; a request after the release recomputes
    it (the same bits, at the cost of the factorization).

    order [K] (optional): GPTQ's column order (act-order with static groups). L and U are then
    the factors of P Hd Pᵀ, the Hessian in that order, which is what GPTQ's loop needs; `solve`
    still takes and returns rows in Hd's own order, since Hd⁻¹ B = Pᵀ (P Hd Pᵀ)⁻¹ (P B).
    """

    def __init__(
        self,
        Hd: torch.Tensor | DampedHessian,
        dtype: torch.dtype = torch.float64,
        solves: int = 0,
        uses: int = 1,
        order: torch.Tensor | None = None,
    ):
        K = Hd.shape[-1]
        if Hd.shape != (K, K):
            raise ValueError(f"Hd has shape {tuple(Hd.shape)}, expected a square [K, K]")
        if order is not None and order.shape != (K,):
            raise ValueError(f"order has shape {tuple(order.shape)}, expected [{K}]")
        self.Hd = Hd
        self.dtype = dtype
        self.solves_left = solves
        self.uses_left = uses
        self.order = order
        self._L: torch.Tensor | None = None
        self._U: torch.Tensor | None = None

    def _cholesky(self) -> torch.Tensor:
        """L [K, K] in `dtype`, column-major (the layout LAPACK works in, so out= needs no copy)."""
        if self._L is None:
            K = self.Hd.shape[0]
            L = torch.empty_strided((K, K), (1, K), dtype=self.dtype, device=self.Hd.device)
            Hd = self.Hd
            if self.order is None and isinstance(Hd, torch.Tensor):
                L.copy_(Hd)
            else:  # (P) Hd (Pᵀ) gathered a row block at a time: no K×K temporary beside L
                order = torch.arange(K, device=L.device) if self.order is None else self.order
                for r in row_slices(K, K, 1 << 22):
                    L[r] = (
                        Hd.rows(order[r], order)
                        if isinstance(Hd, DampedHessian)
                        else Hd[order[r]][:, order]
                    )
            info = torch.empty((), dtype=torch.int32, device=L.device)
            torch.linalg.cholesky_ex(L, out=(L, info))
            if int(info):
                raise ValueError(_NOT_PD)
            release_zero_triangle(L, upper=True)
            self._L = L
        return self._L

    def solve(self, B: torch.Tensor, *, last_block: bool = True) -> torch.Tensor:
        """Hd⁻¹ B for B [K, M] in `dtype` (a Cholesky solve, not a product with Hd⁻¹). A solve
        split into blocks of columns passes last_block=False for all blocks but its last, which
        alone counts as the announced solve."""
        if self.order is None:
            X = _cholesky_solve(B, self._cholesky())
        else:
            X = torch.empty_like(B)
            X[self.order] = _cholesky_solve(B[self.order], self._cholesky())
        if not last_block:
            return X
        self.solves_left = max(self.solves_left - 1, 0)
        if self.solves_left == 0 and (self._U is not None or self.uses_left <= 0):
            self._L = None  # the last announced solve, and U exists or is not wanted
        return X

    def inverse_factor(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """U [K, K] (column-major), the upper Cholesky factor of Hd⁻¹ (of (P Hd Pᵀ)⁻¹, in GPTQ's
        column order, when the factor has an `order`), in `dtype`; None gives the factor's own
        buffer without a conversion. The column loops ask for that and convert a block of rows at
        a time: a float32 copy of the whole factor would sit beside the float64 one (0.8 GiB
        beside 1.6 GiB at K = 14336), and the values are the same."""
        if self._U is None:
            L = self._cholesky()
            buf = L.clone() if self.solves_left else L  # clone keeps the column-major strides
            self._L = L if self.solves_left else None
            del L
            torch.cholesky_inverse(buf, out=buf)
            torch.linalg.cholesky(buf, upper=True, out=buf)
            release_zero_triangle(buf, upper=False)
            self._U = buf
            del buf
        U = self._U
        self.uses_left -= 1
        if self.uses_left <= 0:
            self._U = None  # the caller's reference is the last one
        return U if dtype is None else U.to(dtype)


def inverse_rows(U: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
    """U[i1:i2] [i2 − i1, K] in float32, column-major like U: the block of rows a GPTQ column loop
    works with (its diagonal block and its lazy update), the same values and layout as a slice of
    U converted whole."""
    rows = torch.empty_strided((i2 - i1, U.shape[1]), (1, i2 - i1), dtype=torch.float32,
                               device=U.device)  # fmt: skip
    return rows.copy_(U[i1:i2])


def _cholesky_solve(B: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """(L Lᵀ)⁻¹ B as LAPACK's potrs computes it, L y = B then Lᵀ x = y, without its copy of L.

    torch.cholesky_solve copies L (its out= too): at K = 14336 that is another 1.6 GiB while it
    runs. The two triangular solves read L and Lᵀ as views (L is column-major, so Lᵀ is row-major:
    no copy either way) and the second overwrites y; with this machine's BLAS they give
    cholesky_solve's bits (tests/core/test_gptq.py).
    """
    Y = torch.linalg.solve_triangular(L, B, upper=False)
    return torch.linalg.solve_triangular(L.mT, Y, upper=True, out=Y)


_SOLVE_BYTES = 1 << 26  # one block of GPTAQ's solve: its right-hand sides in the factor's dtype


def inverse_hessian_factor(H: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U), from a damped, positive definite H.

    The factorizations run in `dtype` (float64 by default; float32 is meant for GPUs,
    benchmarks/precision.py measures what it costs); U is returned in float32."""
    return HessianFactor(H, dtype).inverse_factor()


def asymmetric_target(
    W: torch.Tensor,
    H: torch.Tensor | DampedHessian | HessianFactor,
    R: torch.Tensor | None,
    alpha: float = 1.0,
    dtype: torch.dtype = torch.float64,
    *,
    WR: torch.Tensor | None = None,
) -> torch.Tensor:
    """W' = W − α·W R H⁻¹ [N, K]: GPTAQ's asymmetric calibration (arXiv 2504.02692) as a target.

    With R = E[ΔX Xᵀ], the weight whose outputs on the quantized stream X best match W's on the FP
    stream X̃ is w'ᵀ = wᵀE[X̃Xᵀ]H⁻¹ = wᵀ(H − R)H⁻¹, and E‖qᵀX − wᵀX̃‖² = (q − w')ᵀH(q − w') + const.
    So GPTQ (and its grid search) run on W' minimize the FP-stream error, and the codes — not only
    the scales — absorb it. α < 1 damps the correction (GPTAQ's reference code uses 0.25).
    H must be the damped Hessian (positive definite), or its `HessianFactor` (whose dtype then
    replaces `dtype`); the solve runs in `dtype`. WR [N, K] = W R, when accumulated per linear
    (`RowFeedback`), stands in for R.
    """
    factor = H if isinstance(H, HessianFactor) else HessianFactor(H, dtype, solves=1)
    dtype = factor.dtype
    if WR is None:
        if R is None:
            raise ValueError("asymmetric_target needs R = E[ΔX Xᵀ] or WR = W R")
        # W R first, while L does not exist yet (the factor is lazy): the float64 copies of W and
        # R (R is another K×K matrix) are freed before it is computed.
        WR = W.to(dtype) @ R.to(dtype)  # [N, K]: rows wᵀR
    # A block of W's rows at a time: the solve's temporaries in `dtype` (the rows, their solution,
    # and their gather into the factor's order) exist for one block, not for all of W (1.3 GiB
    # at an 8B down_proj).
    N, K = W.shape
    out = torch.empty(N, K, dtype=W.dtype, device=W.device)
    step = max(1, _SOLVE_BYTES // (dtype.itemsize * K))
    for r in range(0, N, step):
        rows = slice(r, r + step)
        Xt = factor.solve(WR[rows].to(dtype).t(), last_block=r + step >= N).t()  # (H⁻¹Rᵀw)ᵀ
        # W − α·X in place, with the same rounding: w + (−(α·x)) is w − α·x exactly in IEEE; W
        # is promoted exactly inside add_; the store rounds to W's dtype.
        out[rows] = Xt.mul_(-alpha).add_(W[rows])
    return out


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor | DampedHessian | HessianFactor,
    grid: Grid,
    group_size: int,
    *,
    block_size: int = 128,
    factor_dtype: torch.dtype = torch.float64,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Integer codes [N, K] for W [N, K] on the fixed grid, minimizing (q − w)ᵀ H (q − w) per row.

    H must already be damped (`DampedHessian`, `damp_hessian`), or be its `HessianFactor`
    (shared with the other linears of the same input; its dtype replaces `factor_dtype`).
    Column j belongs to group j // group_size.
    order [K]: the columns in the order the loop quantizes them (act-order with static groups:
    decreasing H_jj, each column keeping its own group's scale); a `HessianFactor` passed as H
    must have been built with the same order. Codes and W stay in column order either way.
    Also returns Σ Err², which equals Σ_rows (q − w)ᵀ H (q − w) exactly for the H given: the
    Cholesky factor splits the quadratic form into one independent square per column.
    """
    N, K = W.shape
    factor = H if isinstance(H, HessianFactor) else HessianFactor(H, factor_dtype, order=order)
    if (factor.order is None) != (order is None) or (
        order is not None and factor.order is not None and not torch.equal(factor.order, order)
    ):
        raise ValueError("the HessianFactor was built for another column order than `order`")
    # U first: `cholesky_inverse` writes the whole K×K buffer, the factor's largest moment, so
    # the loop's copy of W is made after it (0.2 GiB less at that moment for an 8B down_proj).
    Hinv = factor.inverse_factor(None)  # [K, K] upper triangular, in loop order
    W = W.float().clone() if order is None else W.float()[:, order]  # [N, K] in loop order
    col_group = torch.arange(K, device=W.device) // group_size
    groups = (col_group if order is None else col_group[order]).tolist()  # group of loop column
    maxq = grid.maxq
    # The smallest integer type that holds 0..maxq: a quarter of float32 codes' memory.
    codes = torch.zeros(N, K, dtype=torch.uint8 if maxq <= 255 else torch.int32, device=W.device)
    loss = 0.0
    scale = grid.scale.float()  # [N, n_groups]
    zero = grid.zero.float()

    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()  # [N, B]
        Err1 = torch.zeros_like(W1)
        U1 = inverse_rows(Hinv, i1, i2)  # [B, K] float32
        Hinv1 = U1[:, i1:i2]
        for i in range(i2 - i1):
            g = groups[i1 + i]
            s, z = scale[:, g], zero[:, g]
            w = W1[:, i]
            c = torch.clamp(torch.round(w / s) + z, 0, maxq)
            q = s * (c - z)
            codes[:, i1 + i] = c
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U1[:, i2:]
        loss += float(Err1.square().sum())

    del Hinv  # the last reference: released before the int64 codes exist
    if order is not None:
        codes = codes[:, torch.argsort(order)]  # back to column order
    return codes.to(torch.int64), loss
