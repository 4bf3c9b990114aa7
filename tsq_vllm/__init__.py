"""tsq_vllm: low-bit GPTQ with two-stage group-scale optimization, served through vLLM.

Layers (imports only point downward):
  core/      pure tensor math: Hessians, grids, GPTQ, stage 1, stage 2
  format/      the GPTQ-compatible checkpoint layout: bit packing, config, tensors (no file I/O)
  checkpoint/  checkpoint directories: atomic writes, shards, save/load, config reader, pre-checks
  data         calibration and evaluation text
  models       where a model comes from, and its shape checks before the weights are read
  quantize/    the layer entry point `quantize_weight`, the model pipeline and its CLI
  kernels/     dequant-matmul kernels (torch reference, Triton, CPU fast path)
  serve/       the vLLM plugin and launcher; eval, perplexity

`tsq_vllm.load_quantized(path)` loads a checkpoint for evaluation; it is resolved on first use so
that importing the package stays free of torch and transformers.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_quantized"]


def __getattr__(name: str) -> Any:
    if name == "load_quantized":
        from .checkpoint.hf import load_quantized

        return load_quantized
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
