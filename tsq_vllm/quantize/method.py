"""The per-layer dispatch on the quantization method: what the pipeline loop calls for every linear.

`quantize_linear` returns a result with `stats`, `scales` (for the pipeline's finiteness and
sign checks) and `pack(checkpoint_format)` (the tensors written, which the loaders decode), so
the pipeline loop is the same for every method.
"""

from __future__ import annotations

import torch

from ..format.bcq import BCQTensors
from ..format.gptq import GPTQLayer
from .gptqt_layer import GPTQTWeight, quantize_weight_gptqt_on
from .layer import LinearInput, QuantizedWeight, quantize_weight_on

__all__ = ["PackedLinear", "QuantizedLinear", "quantize_linear"]

QuantizedLinear = QuantizedWeight | GPTQTWeight
PackedLinear = GPTQLayer | BCQTensors


def quantize_linear(W: torch.Tensor, inp: LinearInput) -> QuantizedLinear:
    """Quantize W [N, K] on its prepared input (`layer.prepare_input`) by `inp.scheme.method`:
    "tsq" (`quantize_weight`) or "gptqt"."""
    if inp.scheme.method == "gptqt":
        return quantize_weight_gptqt_on(W, inp)
    return quantize_weight_on(W, inp)
