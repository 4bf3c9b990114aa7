"""GPTQT (Guo, Lang, Ren, arXiv 2407.02891): b₀-bit GPTQ codes converted to k-bit binary coding.

Binary coding (BCQ) with k bits represents a value by k signs b_i ∈ {−1, +1}:

  v(b) = Σ_i α_i b_i + c                                   (2ᵏ levels, i = 1..k)

GPTQT reaches it in two steps. GPTQ first quantizes W [N, K] on a uniform b₀-bit grid per (row n,
group g of G columns): integer codes x ∈ {0 … M}, M = 2^b₀ − 1, with w ≈ s (x − z). Each group's
codes are then mapped to the nearest of 2ᵏ "critical points" chosen on that integer axis.

Admissible level sets. Every level must be an integer in [0, M], so that every converted weight
is still a b₀-bit GPTQ code (the checkpoint can be exported as plain GPTQ). Writing
β_i = (b_i + 1) / 2 ∈ {0, 1}, the levels are

  ℓ(β) = m + Σ_i d_i β_i,   d_i = 2 α_i,   m = c − Σ_i α_i

so "all levels are integers" is exactly "m and every d_i are integers": α_i are half-integers,
c = m + Σ d_i / 2. Flipping the sign of b_i negates α_i, so α_i ≥ 0 (d_i ≥ 0) loses nothing, and
sorting d_1 ≥ … ≥ d_k removes the order symmetry. The admissible set is therefore
{(m, d): d_1 ≥ … ≥ d_k ≥ 0, m ≥ 0, m + Σ d_i ≤ M}: 885 tuples for (k, b₀) = (3, 4), 10 353 for
(3, 5). Coinciding levels (some d_i = 0, or sums that collide) are allowed; they are simply fewer
than 2ᵏ distinct levels.

Critical-point search. With per-column weights h_j = H_jj (the Hessian diagonal), group g of
row n is scored as Σ_j h_j (x_j − ℓ*(x_j))², ℓ*(x) the nearest level (ties go to the lower one).
For a fixed level set the nearest level is optimal per weight, so this only depends on the
weighted histogram hist[n, g, x] = Σ_{j ∈ g, x_j = x} h_j and the error table E[cand, x]:

  cost[n, g, cand] = Σ_x hist[n, g, x] · E[cand, x]        one [N·n_g, M+1] @ [M+1, C] product

Candidates whose level set is a strict subset of another candidate's set can never be better
(every code's nearest distance can only shrink), so only maximal level sets are scored (4810 for
(3, 5)). The argmin over the rest is the exhaustive optimum over all admissible (α, c).

The GPTQT pipeline around this search (a second GPTQ pass on the chosen levels, the scale
re-exploration) is in `gptqt.py`.

Merged inference form. With x' = m + Σ d_i β_i = c + Σ α_i b_i:

  w = s (x' − z) = Σ_i (s α_i) b_i + s (c − z)

which is what `format/bcq.py` stores (s α_i and s (c − z) per group, signs as bit-planes).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cache

import torch

from .blocks import row_slices

__all__ = [
    "BASE_BITS",
    "BCQWeight",
    "LevelCandidates",
    "bc_decode",
    "bc_encode",
    "check_bits",
    "code_histogram",
    "level_candidates",
    "map_codes",
    "search_levels",
]

BASE_BITS = (3, 4, 5)  # b₀: beyond 5 bits the exhaustive candidate set grows as M⁴/144


def _sign_patterns(k: int) -> torch.Tensor:
    """[2ᵏ, k] int64 signs: pattern p has b_i = +1 where bit i of p is set."""
    p = torch.arange(1 << k)[:, None]
    return ((p >> torch.arange(k)) & 1) * 2 - 1


def bc_decode(signs: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Σ_i α_i b_i + c. signs [k, *S] in {−1, +1}; alpha [k, *S] and offset [*S] broadcast."""
    return (alpha * signs.to(alpha.dtype)).sum(0) + offset


def bc_encode(x: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Signs [k, *S] int8 of the level nearest to each x [*S] (ties: lowest sign pattern index)."""
    k = alpha.shape[0]
    patterns = _sign_patterns(k).to(alpha.dtype)  # [P, k]
    shape = (1 << k, k) + (1,) * (alpha.ndim - 1)
    levels = (patterns.reshape(shape) * alpha[None]).sum(1) + offset  # [P, *S]
    best = (x[None] - levels).abs().argmin(0)  # [*S]
    return _sign_patterns(k)[best].movedim(-1, 0).to(torch.int8)


@dataclass(frozen=True)
class LevelCandidates:
    """Every maximal admissible level set for (k, b₀), C of them, and their nearest-level tables.

    low [C] = m, steps [C, k] = d (descending), mapped [C, M+1] nearest level of each code,
    pattern [C, M+1] the sign-pattern index producing that level, error [C, M+1] = (x − mapped)².
    """

    bits: int
    base_bits: int
    low: torch.Tensor
    steps: torch.Tensor
    mapped: torch.Tensor
    pattern: torch.Tensor
    error: torch.Tensor


def check_bits(bits: int, base_bits: int) -> None:
    if base_bits not in BASE_BITS:
        raise ValueError(
            f"intermediate bits b0={base_bits} is not supported: use one of {BASE_BITS}"
        )
    if not 1 <= bits < base_bits:
        raise ValueError(
            f"binary-coding bits k={bits} must satisfy 1 <= k < b0={base_bits}: lower k or raise b0"
        )


@cache
def level_candidates(bits: int, base_bits: int) -> LevelCandidates:
    """The candidate table for k = `bits`, b₀ = `base_bits`, built once per pair."""
    check_bits(bits, base_bits)
    M = (1 << base_bits) - 1
    tuples = [
        (m, *d)
        for d in itertools.combinations_with_replacement(range(M, -1, -1), bits)  # d descending
        for m in range(M - sum(d) + 1)
    ]
    t = torch.tensor(tuples, dtype=torch.int64)
    low, steps = t[:, 0], t[:, 1:]
    beta = (_sign_patterns(bits) + 1) // 2  # [P, k] in {0, 1}
    levels = low[:, None] + steps @ beta.t()  # [T, P]
    # Level sets as bitmasks over the M + 1 codes: dedupe, then drop strict subsets.
    present = torch.zeros(len(t), M + 1, dtype=torch.bool).scatter_(1, levels, True)
    mask = (present.long() << torch.arange(M + 1)).sum(1)
    uniq, first = _first_occurrence(mask)
    dominated = torch.zeros(len(uniq), dtype=torch.bool)
    for r in range(0, len(uniq), 512):
        a = uniq[r : r + 512, None]
        dominated[r : r + 512] = (((a & uniq[None]) == a) & (uniq[None] != a)).any(1)
    keep = first[~dominated]
    low, steps, levels = low[keep], steps[keep], levels[keep]
    x = torch.arange(M + 1)
    # Integer key: twice the distance, +1 when the level lies above x, so ties go to the lower
    # level and then to the lowest pattern index (argmin returns the first minimum).
    diff = levels[:, None, :] - x[None, :, None]  # [C, M+1, P]
    key = 2 * diff.abs() + (diff > 0).long()
    pattern = key.argmin(-1)  # [C, M+1]
    mapped = levels.gather(1, pattern)
    return LevelCandidates(
        bits, base_bits, low, steps, mapped, pattern, (x - mapped).square().float()
    )


def _first_occurrence(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique values and the first index where each occurs, in order of first occurrence."""
    uniq, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((len(uniq),), len(values), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(len(values)), "amin")
    order = torch.argsort(first)
    return uniq[order], first[order]


def code_histogram(
    codes: torch.Tensor, h: torch.Tensor, group_size: int, base_bits: int
) -> torch.Tensor:
    """hist [N, n_g, 2^b₀]: Σ of h_j [K] over the columns j of each group holding each code."""
    N, K = codes.shape
    n_g = K // group_size
    idx = codes.long().reshape(N, n_g, group_size)
    src = h.float().reshape(1, n_g, group_size).expand(N, n_g, group_size)
    return torch.zeros(N, n_g, 1 << base_bits).scatter_add_(2, idx, src)


def search_levels(
    hist: torch.Tensor, cand: LevelCandidates, chunk: int = 1 << 22
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best candidate index [*S] and its weighted squared code error [*S] for hist [*S, 2^b₀]."""
    flat = hist.reshape(-1, hist.shape[-1]).float()
    E = cand.error.t().contiguous()  # [M+1, C]
    best, cost = [], []
    for r in row_slices(flat.shape[0], E.shape[1], chunk):  # bound the [rows, C] score block
        c, i = (flat[r] @ E).min(1)
        best.append(i)
        cost.append(c)
    shape = hist.shape[:-1]
    return torch.cat(best).reshape(shape), torch.cat(cost).reshape(shape)


def map_codes(
    codes: torch.Tensor, best: torch.Tensor, cand: LevelCandidates, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [N, K] moved to the nearest level of their group's set `best` [N, n_g], and signs [k,
    N, K]."""
    N, K = codes.shape
    x = codes.long().reshape(N, K // group_size, group_size)
    mapped = cand.mapped[best].gather(2, x).reshape(N, K)
    pattern = cand.pattern[best].gather(2, x).reshape(N, K)
    signs = ((pattern[None] >> torch.arange(cand.bits)[:, None, None]) & 1) * 2 - 1
    return mapped, signs.to(torch.int8)


@dataclass
class BCQWeight:
    """A GPTQT weight [N, K]: k-bit binary coding on a b₀-bit integer axis, groups contiguous.

    codes [N, K] int64 b₀-bit codes (at most 2ᵏ distinct per (row, group)), scale [N, n_g] float32,
    zero [N, n_g] int64 (the b₀ grid's), low [N, n_g] int64 = m, steps [N, n_g, k] int64 = d,
    signs [k, N, K] int8 in {−1, +1} with codes = m + Σ_i d_i (b_i + 1) / 2.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    low: torch.Tensor
    steps: torch.Tensor
    signs: torch.Tensor
    base_bits: int
    group_size: int
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_bits(self.bits, self.base_bits)
        N, K = self.codes.shape
        n_g = K // self.group_size
        for name, shape in (
            ("scale", (N, n_g)),
            ("zero", (N, n_g)),
            ("low", (N, n_g)),
            ("steps", (N, n_g, self.bits)),
            ("signs", (self.bits, N, K)),
        ):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"BCQWeight.{name} has shape {tuple(getattr(self, name).shape)}, expected "
                    f"{shape}"
                )
        if (
            (self.steps < 0).any()
            or (self.low < 0).any()
            or (self.low + self.steps.sum(-1) > self.maxq).any()
        ):
            raise ValueError(
                f"BCQWeight levels must satisfy d >= 0, m >= 0 and m + sum(d) <= {self.maxq}"
            )
        # A row block at a time: the whole check's [k, N, K] int64 temporaries of a
        # vocabulary-wide head would be several GiB.
        for rows in row_slices(N, K, 1 << 22):
            if not torch.equal(self._codes_from_signs(rows), self.codes[rows].long()):
                raise ValueError("BCQWeight.codes disagree with low + sum(steps * (signs + 1) / 2)")

    @staticmethod
    def cat(parts: list[BCQWeight]) -> BCQWeight:
        """The weight of all rows of `parts` (disjoint row blocks, in order); stats are left to
        the caller. One part is returned as it is."""
        if len(parts) == 1:
            return parts[0]

        def rows(name: str, dim: int = 0) -> torch.Tensor:
            return torch.cat([getattr(p, name) for p in parts], dim=dim)

        return BCQWeight(
            codes=rows("codes"),
            scale=rows("scale"),
            zero=rows("zero"),
            low=rows("low"),
            steps=rows("steps"),
            signs=rows("signs", dim=1),  # [k, N, K]
            base_bits=parts[0].base_bits,
            group_size=parts[0].group_size,
        )

    @property
    def bits(self) -> int:
        return self.steps.shape[-1]

    @property
    def maxq(self) -> int:
        return (1 << self.base_bits) - 1

    def _per_column(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.group_size, dim=1)  # [N, n_g, ...] -> [N, K, ...]

    def _codes_from_signs(self, rows: slice = slice(None)) -> torch.Tensor:
        beta = (self.signs[:, rows].long() + 1) // 2  # [k, n, K]
        d = self._per_column(self.steps[rows]).movedim(-1, 0)  # [k, n, K]
        return self._per_column(self.low[rows]) + (d * beta).sum(0)

    @property
    def alpha(self) -> torch.Tensor:
        """α [N, n_g, k] = d / 2 on the integer axis."""
        return self.steps.float() / 2

    @property
    def offset(self) -> torch.Tensor:
        """c [N, n_g] = m + Σ d_i / 2 on the integer axis."""
        return self.low.float() + self.steps.sum(-1).float() / 2

    def scaled_alpha(self) -> torch.Tensor:
        """s α_i [N, n_g, k]: the per-group binary-coding coefficients the checkpoint stores."""
        return self.scale[..., None] * self.alpha

    def scaled_offset(self) -> torch.Tensor:
        """s (c − z) [N, n_g]: the per-group offset the checkpoint stores."""
        return self.scale * (self.offset - self.zero.float())

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        """W [N, K] = s (codes − z), the b₀-bit GPTQ reading of the same weights (of `rows`)."""
        scale, zero = self._per_column(self.scale[rows]), self._per_column(self.zero[rows])
        return scale * (self.codes[rows] - zero).float()

    def dequantize_bcq(self) -> torch.Tensor:
        """W [N, K] = Σ_i (s α_i) b_i + s (c − z), the binary-coding reading (equal up to
        rounding)."""
        alpha = self._per_column(self.scaled_alpha()).movedim(-1, 0)  # [k, N, K]
        return bc_decode(self.signs, alpha, self._per_column(self.scaled_offset()))
