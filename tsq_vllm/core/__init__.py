"""Pure tensor math: Hessian statistics, grids and scale searches, GPTQ, stage 2. No nn.Module."""

from .gptq import gptq_quantize, inverse_hessian_factor
from .grid import Grid, clip_grid, dequantize_codes, fit_grid, quantize_codes, search_grid
from .hessian import HessianAccumulator, damp_hessian, dead_columns
from .stage2 import Stage2Result, layer_objective, objective, refine_scales, scale_system

__all__ = [
    "Grid",
    "HessianAccumulator",
    "Stage2Result",
    "clip_grid",
    "damp_hessian",
    "dead_columns",
    "dequantize_codes",
    "fit_grid",
    "gptq_quantize",
    "inverse_hessian_factor",
    "layer_objective",
    "objective",
    "quantize_codes",
    "refine_scales",
    "scale_system",
    "search_grid",
]
