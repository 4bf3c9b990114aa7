"""The per-layer dispatch on the quantization method: what the pipeline loop calls for every linear.

`quantize_linear` returns a result with `stats`, `scales` (for the pipeline's finiteness and
sign checks) and `pack(checkpoint_format)` (the tensors written, which the loaders decode), so
the pipeline loop is the same for every method.
"""

from __future__ import annotations

import torch

from ..format.bcq import BCQTensors
from ..format.gptq import GPTQLayer
from .gptqt_layer import GPTQTWeight, quantize_weight_gptqt
from .layer import QuantizedWeight, quantize_weight
from .scheme import LayerScheme

__all__ = ["PackedLinear", "QuantizedLinear", "quantize_linear"]

QuantizedLinear = QuantizedWeight | GPTQTWeight
PackedLinear = GPTQLayer | BCQTensors


def quantize_linear(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: LayerScheme,
    R: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
) -> QuantizedLinear:
    """Quantize W [N, K] by `scheme.method`: "tsq" (`quantize_weight`) or "gptqt"."""
    if scheme.method == "gptqt":
        return quantize_weight_gptqt(W, H, scheme, R=R, D=D)
    return quantize_weight(W, H, scheme, R=R, D=D)
