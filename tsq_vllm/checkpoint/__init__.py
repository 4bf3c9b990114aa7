"""Checkpoint I/O: GPTQ-layout checkpoint directories on disk (layout: docs/format.md).

atomic      the --output directory: overwrite rules, temporary sibling, rename, manifest, cleanup
hf          save_quantized / load_quantized (transformers model <-> safetensors shards), QuantLinear
config      read_quantization_config (the one reader), read_checkpoint_config (strict, for serving)
integrity   safetensors headers and the sha256 fingerprint of the weight files
tensorfile  safetensors read and written one tensor at a time with plain file I/O, no mmap
validate    check_checkpoint_files, the launcher's pre-check of every shard and packed tensor
"""

from .config import (
    SERVABLE_METHODS,
    parse_quant_config,
    read_checkpoint_config,
    read_quantization_config,
)
from .hf import QuantLinear, checkpoint_tensors, load_quantized, save_quantized
from .validate import check_checkpoint_files

__all__ = [
    "SERVABLE_METHODS",
    "QuantLinear",
    "check_checkpoint_files",
    "checkpoint_tensors",
    "load_quantized",
    "parse_quant_config",
    "read_checkpoint_config",
    "read_quantization_config",
    "save_quantized",
]
