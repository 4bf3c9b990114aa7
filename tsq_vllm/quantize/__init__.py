"""Quantization: the one-layer contract `quantize_weight`, and the whole-model pipeline.

quantize_weight   one linear layer (layer.py)
quantize_model    every decoder linear of a causal LM, layer by layer (pipeline.py)
QuantizeOptions   the settings of a run, one field per `python -m tsq_vllm.quantize` flag
LayerScheme       how one linear is quantized (`QuantizeOptions.layer_scheme()`)
"""

from .layer import QuantizedWeight, quantize_weight
from .options import QuantizeOptions
from .pipeline import QuantizeResult, quantize_model
from .scheme import LayerScheme

__all__ = [
    "LayerScheme",
    "QuantizeOptions",
    "QuantizeResult",
    "QuantizedWeight",
    "quantize_model",
    "quantize_weight",
]
