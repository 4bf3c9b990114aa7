"""tsq_vllm: low-bit GPTQ with two-stage group-scale optimization, served through vLLM.

Layers (imports only point downward):
  core/      pure tensor math: Hessians, grids, GPTQ, stage 1, stage 2
  format/    the GPTQ-compatible checkpoint format: bit packing, config, tensors
  quantize/  the layer entry point `quantize_weight`, the model pipeline and its CLI
  kernels/   dequant-matmul kernels (torch reference, Triton, CPU fast path)
  serve/     the vLLM plugin and launcher
"""

__version__ = "0.1.0"
