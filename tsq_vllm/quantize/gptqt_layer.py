"""Quantize one linear layer with GPTQT (docs/gptqt.md): b₀-bit GPTQ, then k-bit binary coding.

    qw = quantize_weight_gptqt(W, H, LayerScheme(bits=3, group_size=64, method="gptqt"), R=R)
    qw.pack("bcq")     # BCQ tensors (format/bcq.py), or qw.pack("gptq"): a plain b₀-bit GPTQ layer

Steps: the first pass of `quantize.layer` (stage-1 grid and GPTQ, at b₀ = intermediate_bits),
then those of `core.gptqt.gptqt_convert` (critical points, the second GPTQ pass, scale
re-exploration with stage 2 inside the scale box). Re-explored scales are rounded to fp16 (the
GPTQ export stores them so) before the final loss is computed. Act-order runs in processing
order, where groups are contiguous, and the result maps back through `g_idx`. A wide weight runs
in row blocks (`row_blocks`).
"""

from __future__ import annotations

import functools
import operator
import time
from dataclasses import dataclass, field

import torch

from ..core.bcq import BCQWeight
from ..core.gptqt import (
    GPTQTSettings,
    Reexplore,
    explore_multipliers,
    gptqt_levels,
    settle_scales,
)
from ..core.stage2 import ScaleSystem, layer_objective, scale_system
from ..format.bcq import BCQ_FORMAT, BCQTensors, pack_bcq
from ..format.gptq import CHECKPOINT_FORMATS, GPTQLayer, pack_linear
from ..format.packing import SUPPORTED_BITS
from .layer import LinearInput, linear_pass, prepare_input, prepare_layer, to_fp16
from .row_blocks import row_blocks
from .scheme import LayerScheme

__all__ = ["GPTQTWeight", "quantize_weight_gptqt", "quantize_weight_gptqt_on"]


@dataclass
class GPTQTWeight:
    """A GPTQT weight [N, K] in `nn.Linear` orientation.

    `bcq` is in processing order; `perm` maps processing position to original input column
    (the identity without act-order). Scales are fp16-representable.
    """

    bcq: BCQWeight
    perm: torch.Tensor
    act_order: bool
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return self.bcq.bits

    @property
    def base_bits(self) -> int:
        return self.bcq.base_bits

    @property
    def group_size(self) -> int:
        return self.bcq.group_size

    @property
    def scales(self) -> torch.Tensor:
        """[N, n_groups] float32: the scales of the b₀-bit grid after re-exploration."""
        return self.bcq.scale

    def _original(self, t: torch.Tensor) -> torch.Tensor:
        """Columns (last dim) of a processing-order tensor back in input order."""
        return t[..., torch.argsort(self.perm)].contiguous()

    @property
    def codes(self) -> torch.Tensor:
        """The b₀-bit codes [N, K] in input order (at most 2ᵏ distinct per row and group)."""
        return self._original(self.bcq.codes)

    @property
    def g_idx(self) -> torch.Tensor:
        """The group [K] of every input column (int64)."""
        K = self.perm.numel()
        return self._original(torch.arange(K) // self.group_size)

    def dequantize(self) -> torch.Tensor:
        """W [N, K] = s (codes − z): the b₀-bit reading (the BCQ one equals it up to rounding)."""
        return self._original(self.bcq.dequantize())

    def pack(self, checkpoint_format: str = BCQ_FORMAT) -> BCQTensors | GPTQLayer:
        """BCQ tensors ("bcq"), or the same weights as a b₀-bit GPTQ layer ("gptq", "gptq_v2")."""
        g_idx = self.g_idx if self.act_order else None
        if checkpoint_format == BCQ_FORMAT:
            return pack_bcq(
                self._original(self.bcq.signs),
                self.bcq.scaled_alpha(),
                self.bcq.scaled_offset(),
                g_idx,
            )
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"checkpoint_format={checkpoint_format!r}: GPTQT writes {BCQ_FORMAT!r} or one of "
                f"{CHECKPOINT_FORMATS}"
            )
        if self.base_bits not in SUPPORTED_BITS:
            raise ValueError(
                f"{self.base_bits}-bit codes have no GPTQ container (GPTQ packs "
                f"{SUPPORTED_BITS} bits): write checkpoint_format={BCQ_FORMAT!r} or use b0=4"
            )
        return pack_linear(
            self.codes,
            self.scales,
            self.bcq.zero,
            self.g_idx,
            self.base_bits,
            checkpoint_format,
            group_size=self.group_size,
        )


def _settings(s: LayerScheme) -> GPTQTSettings:
    reexplore = None
    if s.reexplore:
        reexplore = Reexplore(
            stage2=s.stage2, stage2_sweeps=s.stage2_sweeps, box=s.scale_box or None
        )
    return GPTQTSettings(
        bits=s.bits, requantize=s.requantize, reexplore=reexplore, block_size=s.block_size
    )


def quantize_weight_gptqt(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: LayerScheme,
    R: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
) -> GPTQTWeight:
    """GPTQT-quantize W [N, K] given H [K, K] (R, D as for `quantize_weight`).

    R enters re-exploration weighted by `scheme.error_feedback_alpha` (the objective is linear in
    R). stats: "time_grid", "time_gptq" (first pass), "time_convert", "map_error", "loss_gptq"
    (the b₀-bit first pass's layer loss), "loss" (after conversion, fp16 scales), and with
    re-exploration "loss_mapped" and "rows_reverted" (`core.gptqt.reexplore_scales`).
    """
    return quantize_weight_gptqt_on(W, prepare_input(H, scheme, R, D))


def quantize_weight_gptqt_on(W: torch.Tensor, inp: LinearInput) -> GPTQTWeight:
    """`quantize_weight_gptqt` on an input prepared once for all the linears that read it.

    A wide W runs in row blocks (`row_blocks`, one read of the input each): both GPTQ passes, the
    level search and re-exploration's γ grid and system per block, its stage 2 and per-row check
    once on all rows (`core.gptqt.settle_scales`).
    """
    s = inp.scheme
    if s.method != "gptqt":
        raise ValueError(f"scheme.method={s.method!r}: quantize_weight_gptqt needs 'gptqt'")
    if inp.feedbacks is not None:
        raise ValueError("GPTQT reads R = E[ΔX Xᵀ] itself: prepare its input without feedback")
    settings = _settings(s)
    R_alpha = None if inp.R is None else s.error_feedback_alpha * inp.R
    blocks = row_blocks(*W.shape)
    parts = [_convert_rows(W[rows], inp, settings, R_alpha) for rows in blocks]
    stats = {k: _total(parts, k) for k in ("time_grid", "time_gptq", "loss_gptq", "map_error")}
    t = time.perf_counter()
    bw = BCQWeight.cat([b.bcq for b in parts])
    if settings.reexplore is not None:
        system = ScaleSystem.cat([b.system for b in parts if b.system is not None])
        best = torch.cat([b.best for b in parts if b.best is not None])
        bw.scale, more = settle_scales(system, bw.scale, best, settings.reexplore)
        stats.update(more)
        del system, best
    bw.scale = to_fp16(bw.scale)
    # The layer loss of what is written (fp16 scales), W's rows in processing order again.
    stats["loss"] = functools.reduce(
        operator.add,
        (
            layer_objective(W[rows].float()[:, inp.perm], bw.dequantize(rows), inp.H, R_alpha)
            for rows in blocks
        ),
    )
    stats["time_convert"] = _total(parts, "time_convert") + time.perf_counter() - t
    return GPTQTWeight(bw, inp.perm, s.act_order, stats)


@dataclass
class _Rows:
    """One row block's BCQ weight on its grid's scales, re-exploration's explored scales and
    system of its rows (with re-exploration), and its stats (times, first-pass loss)."""

    bcq: BCQWeight
    best: torch.Tensor | None
    system: ScaleSystem | None
    stats: dict[str, float]


def _total(parts: list[_Rows], key: str) -> float:
    return functools.reduce(operator.add, (b.stats[key] for b in parts))


def _convert_rows(
    W: torch.Tensor, inp: LinearInput, settings: GPTQTSettings, R_alpha: torch.Tensor | None
) -> _Rows:
    """The first pass and the per-row part of the conversion, on rows W [n, K]."""
    s = inp.scheme
    G = s.group_size
    p = prepare_layer(W, inp)
    grid, codes, _, stats = linear_pass(p, s, s.intermediate_bits)
    stats["loss_gptq"] = layer_objective(
        p.W,
        grid.scale.repeat_interleave(G, 1) * (codes - grid.zero.repeat_interleave(G, 1)),
        p.H,
        R_alpha,
    )
    t = time.perf_counter()
    bw = gptqt_levels(
        p.W,
        p.H,
        codes,
        grid,
        G,
        settings,
        # The second pass factorizes in float64: at that precision the first pass's U is its U.
        H_damped=p.factor if p.factor.dtype == torch.float64 else p.Hd,
        gptq_target=p.Wq,
    )
    stats["map_error"] = bw.stats["map_error"]
    out = _Rows(bw, None, None, stats)
    if settings.reexplore is not None:
        H, Wf = p.H.float(), p.W.float()
        U = (bw.codes - grid.zero.repeat_interleave(G, dim=1)).float()
        out.best = explore_multipliers(Wf, U, bw.scale, H, G, settings.reexplore)
        out.system = scale_system(Wf, U, H, R_alpha, G)
    stats["time_convert"] = time.perf_counter() - t
    return out
