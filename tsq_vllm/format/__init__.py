"""The GPTQ-compatible checkpoint format: bit packing, per-layer tensors, config."""

from .gptq import CHECKPOINT_FORMATS, GPTQTensors, check_tensors, dequantize, pack_linear, unpack_linear
from .config import QUANT_METHOD, SUPPORTED_GROUP_SIZES, QuantizationConfig
from .packing import SUPPORTED_BITS, pack, pack_factor, run_length, unpack

__all__ = [
    "CHECKPOINT_FORMATS",
    "GPTQTensors",
    "check_tensors",
    "QUANT_METHOD",
    "QuantizationConfig",
    "SUPPORTED_GROUP_SIZES",
    "SUPPORTED_BITS",
    "dequantize",
    "pack",
    "pack_factor",
    "pack_linear",
    "run_length",
    "unpack",
    "unpack_linear",
]
