"""The GPTQ-compatible checkpoint format: bit packing, per-layer tensors, config."""

from .config import QUANT_METHOD, SUPPORTED_GROUP_SIZES, CheckpointQuantConfig
from .gptq import (
    CHECKPOINT_FORMATS,
    TENSOR_NAMES,
    GPTQLayer,
    check_linear_shape,
    pack_linear,
    packed_shapes,
    zero_offset,
)
from .packing import SUPPORTED_BITS, pack, pack_factor, run_length, unpack

__all__ = [
    "CHECKPOINT_FORMATS",
    "CheckpointQuantConfig",
    "GPTQLayer",
    "QUANT_METHOD",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "TENSOR_NAMES",
    "check_linear_shape",
    "pack",
    "pack_factor",
    "pack_linear",
    "packed_shapes",
    "run_length",
    "unpack",
    "zero_offset",
]
