"""Quantization: the one-layer contract `quantize_weight`, and the whole-model pipeline."""

from .layer import QuantizedWeight, quantize_weight

__all__ = ["QuantizedWeight", "quantize_weight"]
