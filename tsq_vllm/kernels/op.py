"""The public entry point `dequant_matmul` and the `tsq::dequant_matmul` torch custom op.

`dequant_matmul` picks a backend per call (CUDA tensors → Triton, CPU → the torch reference)
unless told. The custom op wraps the same choice so vLLM's `apply` and torch.compile see one
opaque op with a shape-only fake implementation; it is registered on first use by `register_op`
(never at import: registration touches the global dispatcher and must not break `import`).
The Triton module is imported lazily too, so the CPU path works where triton is absent.
"""

from __future__ import annotations

import threading

import torch

from .reference import check_inputs, dequant_matmul_reference, zero_offset

__all__ = ["BACKENDS", "OP_NAME", "dequant_matmul", "register_op", "dequant_matmul_op"]

BACKENDS = ("triton", "torch")
OP_NAME = "tsq::dequant_matmul"

_lock = threading.Lock()
_op = None


def _triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    checkpoint_format: str,
) -> torch.Tensor:
    from .triton_kernels import dequant_matmul_triton

    return dequant_matmul_triton(x, qweight, qzeros, scales, g_idx, bits=bits, checkpoint_format=checkpoint_format)


def dequant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    checkpoint_format: str = "gptq",
    backend: str | None = None,
) -> torch.Tensor:
    """y [..., N] = x [..., K] · W, W [K, N] decoded per group from the GPTQ checkpoint tensors.

    qweight int32 [K*bits/32, N], qzeros int32 [K/G, N*bits/32] ("gptq": stored z - 1;
    "gptq_v2": z), scales [K/G, N], g_idx [K] or None (None = k // G, the fast path: drop a
    sequential g_idx at load time with `reference.sequential_g_idx`).
    backend: None picks by device (cuda → "triton", otherwise "torch"); "triton" forces the
    kernels (CPU tensors only under TRITON_INTERPRET=1); "torch" the fp32 reference.
    """
    zero_offset(checkpoint_format)
    if x.dim() < 1:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected [..., K]")
    check_inputs(x.reshape(-1, x.shape[-1]), qweight, qzeros, scales, g_idx, bits)
    if backend is None:
        backend = "triton" if x.is_cuda else "torch"
    if backend == "triton":
        return _triton(x, qweight, qzeros, scales, g_idx, bits, checkpoint_format)
    if backend == "torch":
        return dequant_matmul_reference(x, qweight, qzeros, scales, g_idx, bits=bits,
                                        checkpoint_format=checkpoint_format)
    raise ValueError(f"backend={backend!r} is not supported: use None, 'triton' or 'torch'")


def register_op():
    """Register `tsq::dequant_matmul` (idempotent) and return `torch.ops.tsq.dequant_matmul`.

    Schema: (x, qweight, qzeros, scales, g_idx?, bits, checkpoint_format) -> y [..., N].
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
            checkpoint_format: str,
        ) -> torch.Tensor:
            return dequant_matmul_reference(x, qweight, qzeros, scales, g_idx, bits=bits,
                                            checkpoint_format=checkpoint_format)

        @_dequant_matmul.register_kernel("cuda")
        def _cuda(x, qweight, qzeros, scales, g_idx, bits, checkpoint_format):
            return _triton(x, qweight, qzeros, scales, g_idx, bits, checkpoint_format)

        @_dequant_matmul.register_fake
        def _fake(x, qweight, qzeros, scales, g_idx, bits, checkpoint_format):
            return x.new_empty(*x.shape[:-1], scales.shape[1])

        _op = torch.ops.tsq.dequant_matmul
        return _op


def dequant_matmul_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    checkpoint_format: str = "gptq",
) -> torch.Tensor:
    """`dequant_matmul` through the registered custom op (what vLLM's apply should call).

    Call `register_op()` once before torch.compile traces this (e.g. when weights are loaded):
    tracing the first-use registration would break the graph.
    """
    op = _op if _op is not None else register_op()
    return op(x, qweight, qzeros, scales, g_idx, bits, checkpoint_format)
