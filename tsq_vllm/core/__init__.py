"""Pure tensor math: Hessian statistics, grids and scale searches, GPTQ, stage 2. No nn.Module."""

from .gptq import (
    HessianFactor,
    asymmetric_target,
    gptq_quantize,
    inverse_hessian_factor,
    inverse_rows,
)
from .grid import Grid, clip_grid, dequantize_codes, fit_grid, quantize_codes, search_grid
from .hessian import DampedHessian, HessianAccumulator, damp_hessian, dead_columns
from .stage2 import (
    OutputStats,
    ScaleSystem,
    Stage2Result,
    energy_match,
    layer_objective,
    output_stats,
    refine_scales,
    scale_system,
)

__all__ = [
    "DampedHessian",
    "Grid",
    "HessianAccumulator",
    "HessianFactor",
    "OutputStats",
    "ScaleSystem",
    "Stage2Result",
    "asymmetric_target",
    "clip_grid",
    "damp_hessian",
    "dead_columns",
    "dequantize_codes",
    "energy_match",
    "fit_grid",
    "gptq_quantize",
    "inverse_hessian_factor",
    "inverse_rows",
    "layer_objective",
    "output_stats",
    "quantize_codes",
    "refine_scales",
    "scale_system",
    "search_grid",
]
