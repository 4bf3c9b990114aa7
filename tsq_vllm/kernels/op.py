"""The public entry point `dequant_matmul` and the `tsq::dequant_matmul` torch custom op.

`dequant_matmul` picks a backend per call (CUDA tensors → Triton, CPU → the torch reference)
unless told. The custom op wraps the same choice so vLLM's `apply` and torch.compile see one
opaque op with a shape-only fake implementation; it is registered on first use by `register_op`
(never at import: registration touches the global dispatcher and must not break `import`).
The custom op is the only place a `GPTQLayer` is taken apart into tensors (the dispatcher takes
no dataclasses). The Triton module is imported lazily too, so the CPU path works where triton
is absent.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ..format.gptq import GPTQLayer
from .reference import check_input, dequant_matmul_reference

__all__ = ["BACKENDS", "OP_NAME", "dequant_matmul", "dequant_matmul_op", "op_args", "register_op"]

BACKENDS = ("triton", "torch")
OP_NAME = "tsq::dequant_matmul"

_lock = threading.Lock()
_op: Any = None


def _triton(x: torch.Tensor, layer: GPTQLayer) -> torch.Tensor:
    from .triton_kernels import dequant_matmul_triton

    return dequant_matmul_triton(x, layer)


def dequant_matmul(
    x: torch.Tensor, layer: GPTQLayer, *, backend: str | None = None
) -> torch.Tensor:
    """y [..., N] = x [..., K] · W, W [K, N] decoded per group from the layer's GPTQ tensors.

    A layer whose g_idx is None takes the fast path (drop a sequential g_idx at load time with
    `GPTQLayer.drop_sequential_g_idx`).
    backend: None picks by device (cuda → "triton", otherwise "torch"); "triton" forces the
    kernels (CPU tensors only under TRITON_INTERPRET=1); "torch" the fp32 reference.
    """
    if x.dim() < 1:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected [..., K]")
    check_input(x.reshape(-1, x.shape[-1]), layer)
    if backend is None:
        backend = "triton" if x.is_cuda else "torch"
    if backend == "triton":
        return _triton(x, layer)
    if backend == "torch":
        return dequant_matmul_reference(x, layer)
    raise ValueError(f"backend={backend!r} is not supported: use None, 'triton' or 'torch'")


def register_op() -> Any:
    """Register `tsq::dequant_matmul` (idempotent) and return `torch.ops.tsq.dequant_matmul`.

    Schema: (x, qweight, qzeros, scales, g_idx?, bits, group_size, checkpoint_format) -> y [..., N].
    CUDA runs the Triton kernels, every other device the torch reference.
    """
    global _op
    with _lock:
        if _op is not None:
            return _op

        @torch.library.custom_op(OP_NAME, mutates_args=())
        def _dequant_matmul(
            x: torch.Tensor,
            qweight: torch.Tensor,
            qzeros: torch.Tensor,
            scales: torch.Tensor,
            g_idx: torch.Tensor | None,
            bits: int,
            group_size: int,
            checkpoint_format: str,
        ) -> torch.Tensor:
            layer = GPTQLayer(qweight, qzeros, scales, g_idx, bits, group_size, checkpoint_format)
            return dequant_matmul_reference(x, layer)

        @_dequant_matmul.register_kernel("cuda")
        def _cuda(x, qweight, qzeros, scales, g_idx, bits, group_size, checkpoint_format):
            return _triton(
                x, GPTQLayer(qweight, qzeros, scales, g_idx, bits, group_size, checkpoint_format)
            )

        @_dequant_matmul.register_fake
        def _fake(x, qweight, qzeros, scales, g_idx, bits, group_size, checkpoint_format):
            return x.new_empty(*x.shape[:-1], scales.shape[1])

        _op = torch.ops.tsq.dequant_matmul
        return _op


def op_args(layer: GPTQLayer) -> tuple[Any, ...]:
    """The layer as the custom op's arguments after x."""
    return (
        layer.qweight,
        layer.qzeros,
        layer.scales,
        layer.g_idx,
        layer.bits,
        layer.group_size,
        layer.checkpoint_format,
    )


def dequant_matmul_op(x: torch.Tensor, layer: GPTQLayer) -> torch.Tensor:
    """`dequant_matmul` through the registered custom op (what vLLM's apply should call).

    Call `register_op()` once before torch.compile traces this (e.g. when weights are loaded):
    tracing the first-use registration would break the graph.
    """
    op = _op if _op is not None else register_op()
    return op(x, *op_args(layer))
