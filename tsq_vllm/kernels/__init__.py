"""Dequant-matmul kernels for GPTQ weights: y = x · W with W decoded per group on the fly.

`dequant_matmul(x, layer)` is the entry point; `dequant_matmul_reference` (torch, fp32) is the
specification; `register_op` / `dequant_matmul_op` expose the `tsq::dequant_matmul` custom op.
The Triton kernels (`triton_jit`, launched from `triton_kernels`) are imported only when used.
`backends` holds the serving backends (Triton, aten int4, vLLM's CPU WNA16, dense) as classes
and `choose_backend`, which picks one per layer.
"""

from .op import BACKENDS, OP_NAME, dequant_matmul, dequant_matmul_op, register_op
from .reference import check_input, dequant_matmul_reference

__all__ = [
    "BACKENDS",
    "OP_NAME",
    "check_input",
    "dequant_matmul",
    "dequant_matmul_op",
    "dequant_matmul_reference",
    "register_op",
]
