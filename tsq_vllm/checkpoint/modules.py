"""The modules a loaded quantized checkpoint's linears become (`hf.load_quantized`).

`QuantLinear` keeps the GPTQ tensors and dequantizes with the torch reference on every call;
`BCQLinear` (GPTQT's binary coding) is decoded once with `format.bcq.dequantize_bcq`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..format.bcq import BCQ_TENSOR_NAMES, BCQTensors
from ..format.gptq import TENSOR_NAMES, GPTQLayer

__all__ = ["BCQLinear", "QuantLinear"]


class QuantLinear(nn.Module):
    """A linear layer stored as GPTQ tensors; each forward decodes W with the torch reference."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor

    def __init__(self, layer: GPTQLayer, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = layer.K, layer.N
        self.bits, self.group_size, self.checkpoint_format = (
            layer.bits,
            layer.group_size,
            layer.checkpoint_format,
        )
        for name, t in zip(
            TENSOR_NAMES, (layer.qweight, layer.qzeros, layer.scales, layer.full_g_idx), strict=True
        ):
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def layer(self) -> GPTQLayer:
        """The buffers as a `GPTQLayer` (they follow the module across devices)."""
        return GPTQLayer(
            self.qweight,
            self.qzeros,
            self.scales,
            self.g_idx,
            self.bits,
            self.group_size,
            self.checkpoint_format,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W in nn.Linear orientation [N, K]."""
        return self.layer.dequantize(dtype=dtype or torch.float32).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"checkpoint_format={self.checkpoint_format}, bias={self.bias is not None}"
        )


class BCQLinear(nn.Module):
    """A linear layer stored as BCQ tensors, decoded once by the reference (`dequantize_bcq`).

    The packed tensors are the persistent buffers; the decoded weight [N, K] is kept beside them
    (not saved) in the activation dtype, so forward is one dense matmul.
    """

    bcq_bits: torch.Tensor
    bcq_alpha: torch.Tensor
    bcq_offset: torch.Tensor
    weight: torch.Tensor

    def __init__(self, layer: BCQTensors, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.bits = layer.K, layer.N, layer.bits
        for name in BCQ_TENSOR_NAMES[:3]:
            self.register_buffer(name, getattr(layer, name))
        if layer.g_idx is not None:
            self.register_buffer("g_idx", layer.g_idx)
        self.register_buffer(
            "weight", layer.dequantize(torch.float32).t().contiguous().to(dtype), persistent=False
        )
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W in nn.Linear orientation [N, K], by the reference decode."""
        g_idx = getattr(self, "g_idx", None)
        layer = BCQTensors(self.bcq_bits, self.bcq_alpha, self.bcq_offset, g_idx)
        return layer.dequantize(dtype or torch.float32).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bcq_bits={self.bits}, bias={self.bias is not None}"
        )
