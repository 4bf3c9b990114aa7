"""Quantization: the one-layer contract `quantize_weight`, and the whole-model pipeline.

  quantize_weight   one linear layer (layer.py)
  quantize_model    every decoder linear of a causal LM, layer by layer (pipeline.py)
  save_quantized    the GPTQ-layout checkpoint writer, load_quantized its reader (checkpoint.py)
  QuantizeOptions   the settings of a run, one field per `python -m tsq_vllm.quantize` flag
  LayerScheme       how one linear is quantized (`QuantizeOptions.layer_scheme()`)
"""

from .checkpoint import QuantLinear, load_quantized, save_quantized
from .layer import QuantizedWeight, quantize_weight
from .options import QuantizeOptions
from .pipeline import QuantizeResult, quantize_model
from .scheme import LayerScheme

__all__ = [
    "LayerScheme",
    "QuantLinear",
    "QuantizeOptions",
    "QuantizeResult",
    "QuantizedWeight",
    "load_quantized",
    "quantize_model",
    "quantize_weight",
    "save_quantized",
]
