"""tsq_vllm: low-bit GPTQ with two-stage group-scale optimization, served through vLLM.

Layers (imports only point downward):
  core/      pure tensor math: Hessians, grids, GPTQ, stage 1, stage 2
  format/    the GPTQ-compatible checkpoint format: bit packing, config, tensors
  quantize/  the layer entry point `quantize_weight`, the model pipeline and its CLI
  kernels/   dequant-matmul kernels (torch reference, Triton, CPU fast path)
  serve/     the vLLM plugin and launcher

`tsq_vllm.load_quantized(path)` loads a checkpoint for evaluation; it is resolved on first use so
that importing the package stays free of torch and transformers.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_quantized"]


def __getattr__(name: str) -> Any:
    if name == "load_quantized":
        from .quantize.checkpoint import load_quantized

        return load_quantized
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
