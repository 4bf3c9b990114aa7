"""How one linear layer is quantized: `LayerScheme`, the one object `quantize_weight` takes.

Built once per run from `QuantizeOptions.layer_scheme()` (or directly, for one layer), validated
on construction, then passed whole, so the per-layer step has no long parameter list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format.packing import check_bits

__all__ = [
    "BCQ_BITS",
    "INTERMEDIATE_BITS",
    "METHODS",
    "DEFAULT_ERROR_FEEDBACK_ALPHA",
    "DEFAULT_REFINE_LR",
    "BlockRefineScheme",
    "DEFAULT_GPTAQ_ALPHA",
    "DEFAULT_SCALE_BOX",
    "GPTQ_ORDERS",
    "SCALE_SEARCHES",
    "PRECISIONS",
    "LayerScheme",
]

SCALE_SEARCHES = ("minmax", "mse")
# "tsq": GPTQ + the two-stage scale search; "gptqt": b0-bit GPTQ converted to k-bit binary coding.
METHODS = ("tsq", "gptqt")
BCQ_BITS = (2, 3)  # k of GPTQT's binary coding
INTERMEDIATE_BITS = (4, 5)  # GPTQT's first-pass depth b0
PRECISIONS = ("float64", "float32")
GPTQ_ORDERS = ("act", "natural")
# The best of the grid measured on SmolLM2-135M INT2 and INT3 g64
# (benchmarks/results/stage2_variants.md).
DEFAULT_ERROR_FEEDBACK_ALPHA = 0.25
DEFAULT_SCALE_BOX = 2.0
DEFAULT_GPTAQ_ALPHA = 0.25


@dataclass(frozen=True)
class LayerScheme:
    """Settings of one layer's quantization (the steps are described in `quantize.layer`).

    stage1: choose each group's clip by (q − w)ᵀ H_ii (q − w); otherwise `scale_search`
      ("minmax", or "mse" with exponent `mse_norm`: the plain-GPTQ choices).
    stage2: refine the scales after GPTQ on eq. (7), with R when given (up to `stage2_sweeps`).
    act_order: process columns by decreasing H_jj; groups are formed in that order (`desc_act`).
    gptq_order: "act" runs GPTQ's column loop by decreasing H_jj with the groups kept in input
      order (act-order with static groups: the grid is fixed before the loop anyway, so each
      column uses its own group's scale; no g_idx, no serving cost), "natural" in input order;
      None (the default) is "act" for tsq and "natural" for gptqt, whose passes run in input
      order only (unless `act_order`).
    gptq: False rounds to nearest on the grid instead (the RTN baseline).
    zero_min: smallest asymmetric zero point; 1 for GPTQ v1 checkpoints, which store z − 1.
    damp: Hessian dampening as a fraction of the mean diagonal; block_size: GPTQ's lazy-batch width.
    error_feedback_alpha: weight of R in stage 2 (1: the paper's eq. (7), 0: R ignored).
    scale_box: β keeps stage 2's scales in [s0/β, β·s0] around the grid's s0 > 0; 0 leaves
      them unbounded.
    energy_match: after stage 2, rescale each row so qᵀHq equals the FP output energy (needs D
      with R).
    gptaq_alpha: with R, the grid and GPTQ target W − α·W R H⁻¹ instead of W (GPTAQ); 0 is off.
    method: "tsq", or "gptqt" (`quantize.gptqt_layer`): the grid and GPTQ run at
      `intermediate_bits` = b₀, the codes are converted to `bits`-bit binary coding, requantized
      by a second GPTQ pass (`requantize`) and the scales re-explored (`reexplore`; its stage 2
      is `stage2`, with `scale_box` and R weighted by `error_feedback_alpha`).
    precision: dtype of the Hessian accumulation and of GPTQ's and GPTAQ's factorizations
      ("float64" or "float32"; the other steps run in float32 with float64 reductions either way).
    """

    bits: int
    group_size: int
    sym: bool = False
    act_order: bool = False
    gptq_order: str | None = None
    damp: float = 0.01
    stage1: bool = True
    stage2: bool = True
    gptq: bool = True
    scale_search: str = "minmax"
    mse_norm: float = 2.0
    clip_points: int = 100
    zero_min: int = 1
    stage2_sweeps: int = 20
    block_size: int = 128
    error_feedback_alpha: float = DEFAULT_ERROR_FEEDBACK_ALPHA
    scale_box: float = DEFAULT_SCALE_BOX
    energy_match: bool = False
    gptaq_alpha: float = DEFAULT_GPTAQ_ALPHA
    method: str = "tsq"
    intermediate_bits: int = 4
    requantize: bool = True
    reexplore: bool = True
    precision: str = "float64"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is not supported: use one of {METHODS}")
        if self.method == "gptqt":
            if self.intermediate_bits not in INTERMEDIATE_BITS:
                raise ValueError(
                    f"--intermediate-bits {self.intermediate_bits} is not supported: use one of "
                    f"{', '.join(map(str, INTERMEDIATE_BITS))}"
                )
            if self.bits not in BCQ_BITS:
                raise ValueError(
                    f"--bits {self.bits} is not supported with --method gptqt: binary coding uses "
                    f"{' or '.join(map(str, BCQ_BITS))} bits"
                )
        check_bits(self.bits)
        if self.gptq_order is None:  # the method's own order (frozen: set once, here)
            object.__setattr__(self, "gptq_order", "natural" if self.method == "gptqt" else "act")
        if self.gptq_order not in GPTQ_ORDERS:
            raise ValueError(
                f"--gptq-order {self.gptq_order!r} is not supported: use one of {GPTQ_ORDERS}"
            )
        if self.gptq_order == "act" and self.method == "gptqt" and not self.act_order:
            raise ValueError(
                "--gptq-order act is not supported with --method gptqt (its second pass runs in "
                "input order): use --gptq-order natural, or --act-order"
            )
        if self.group_size < 1:
            raise ValueError(
                f"group_size={self.group_size} must be at least 1: use e.g. 32, 64 or 128"
            )
        if self.scale_search not in SCALE_SEARCHES:
            raise ValueError(
                f"scale_search={self.scale_search!r} is not supported: use one of {SCALE_SEARCHES}"
            )
        if not 0.0 <= self.damp < 1.0:
            raise ValueError(
                f"damp={self.damp} must lie in [0, 1): it is a fraction of the mean Hessian "
                "diagonal"
            )
        if self.mse_norm <= 0:
            raise ValueError(f"mse_norm={self.mse_norm} must be positive (2 is least squares)")
        for name in ("clip_points", "stage2_sweeps", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.zero_min not in (0, 1):
            raise ValueError(
                f"zero_min={self.zero_min} must be 0 (gptq_v2) or 1 (gptq v1 stores z - 1)"
            )
        if not 0.0 <= self.error_feedback_alpha <= 1.0:
            raise ValueError(
                f"--error-feedback-alpha {self.error_feedback_alpha} must lie in [0, 1] (1 is the "
                "paper's R)"
            )
        if self.scale_box != 0 and not self.scale_box >= 1.0:
            raise ValueError(
                f"--scale-box {self.scale_box} must be 0 (no box) or at least 1 (the interval "
                "[s0/B, B*s0])"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"--precision {self.precision!r} is not supported: use one of {PRECISIONS}"
            )
        if not 0.0 <= self.gptaq_alpha <= 1.0:
            raise ValueError(f"--gptaq-alpha {self.gptaq_alpha} must lie in [0, 1] (0 is off)")

    @property
    def math_dtype(self) -> torch.dtype:
        return torch.float64 if self.precision == "float64" else torch.float32

    @property
    def grid_method(self) -> str:
        """The clip search `core.grid.search_grid` runs: stage 1's "hessian", or `scale_search`."""
        return "hessian" if self.stage1 else self.scale_search


# SmolLM2-135M INT3 g64, 25 steps: 22.71 -> 22.58 at 5e-3, 22.84 at 2e-2; INT2 g64 gained 16 % at
# 2e-2, 5e-3 not measured there (docs/algorithm.md, benchmarks/results/stage2_variants.md).
DEFAULT_REFINE_LR = 5e-3


@dataclass(frozen=True)
class BlockRefineScheme:
    """steps: Adam steps per decoder block (0 = off), one calibration batch (--batch-size
    windows) per step, batches in an order drawn from `seed`; lr: the initial learning rate of
    θ = log(s / s_t), decaying linearly to 0; box: the scale box B of stage 2 (None = unbounded)."""

    steps: int = 0
    lr: float = DEFAULT_REFINE_LR
    seed: int = 0
    box: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(
                f"--refine-block {self.steps} must be 0 (off) or a positive number of steps per "
                "decoder block"
            )
        if not 0.0 < self.lr <= 1.0:
            raise ValueError(f"--refine-lr {self.lr} must lie in (0, 1] (e.g. 5e-3)")

    def order(self, layer_index: int, n_batches: int) -> list[int]:
        """The minibatch of every step: shuffled passes over the batches, fixed by seed and
        layer."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + layer_index)
        out: list[int] = []
        while len(out) < self.steps:
            out += torch.randperm(n_batches, generator=gen).tolist()
        return out[: self.steps]
