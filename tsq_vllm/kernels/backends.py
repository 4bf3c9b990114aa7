"""Kernel backends for one GPTQ-packed linear, and the chooser that picks one per layer.

The pattern is vLLM's `MPLinearKernel` / `choose_mp_linear_kernel`: every backend says, for a
layer and an activation dtype, whether it can serve it and if not why (`can_implement`), owns the
one-time weight preparation (`prepare`, run from the linear method's
`process_weights_after_loading`) and the per-call matmul (`apply`). `choose_backend` tries them in
`PRIORITY` order and takes the first that accepts; the dense fallback accepts every layer, so a
layer is always served. The reasons of the rejected backends are logged once per layer shape.

  triton       CUDA: the Triton dequant-matmul behind the `tsq::dequant_matmul` custom op
  native-int4  CPU, bf16, AVX512-BF16: this package's kernel (`kernels.cpu_native`), each decoded
               weight tile reused across the batch; compiled on first use
  aten-int4    CPU, bf16: codes repacked into aten's CPU int4 layout (`kernels.cpu`)
  wna16        CPU, bf16/fp16: vLLM's own `cpu_gemm_wna16` (`kernels.wna16`), where the loaded
               vLLM kernel library has it (checked at run time: x86 AVX-512, ARM builds)
  dense        any device and dtype: the weight decoded once, a dense matmul (exact in fp32)

Every backend's `apply` computes `kernels.reference.dequant_matmul_reference` up to rounding in
the activation dtype; the tests hold each one to it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..format.gptq import GPTQLayer
from . import wna16 as _wna16
from .cpu import (
    CPUQuantizedLinear,
    block_layout,
    group_blocks,
    int4_kernel_available,
    native_refusal,
    prepare_cpu_linear,
)

__all__ = [
    "AtenInt4Backend",
    "BackendChoice",
    "DenseBackend",
    "LinearBackend",
    "NativeInt4Backend",
    "PRIORITY",
    "TritonBackend",
    "WNA16Backend",
    "choose_backend",
    "log_once",
    "prepare_backend",
]

logger = logging.getLogger(__name__)

_ATEN_INT4_GROUPS = (32, 64, 128, 256)  # block sizes aten's CPU int4 kernel takes


def _local_groups(layer: GPTQLayer) -> bool:
    """Whether the scales hold exactly this layer's K / G groups.

    A row-parallel shard of an act-order layer keeps every group of the whole layer (its columns
    may use any of them); no grouped kernel can tile those, only the dense decode serves them.
    """
    return layer.n_groups * layer.group_size == layer.K


class LinearBackend(ABC):
    """One way to run y = x · W for a GPTQ layer; an instance holds the prepared weight."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def can_implement(cls, layer: GPTQLayer, act_dtype: torch.dtype) -> tuple[bool, str | None]:
        """(True, None), or (False, why not) in one phrase. May read tensor values: call it once
        at load time."""

    @classmethod
    @abstractmethod
    def prepare(cls, layer: GPTQLayer, act_dtype: torch.dtype) -> LinearBackend:
        """Convert the checkpoint tensors once; the result's `apply` serves every call."""

    @abstractmethod
    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y [..., N] in x's dtype for x [..., K]."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of the prepared tensors (what serving keeps resident)."""

    @property
    def keeps_checkpoint_tensors(self) -> bool:
        """Whether `apply` reads the checkpoint tensors themselves (else they can be freed)."""
        return False


class TritonBackend(LinearBackend):
    """The Triton kernels through `tsq::dequant_matmul` (one opaque op for torch.compile)."""

    name = "triton"

    def __init__(self, layer: GPTQLayer) -> None:
        self.layer = layer

    @classmethod
    def can_implement(cls, layer: GPTQLayer, act_dtype: torch.dtype) -> tuple[bool, str | None]:
        if layer.qweight.device.type != "cuda":
            return False, f"the layer is on {layer.qweight.device}: the Triton kernels run on CUDA"
        if act_dtype not in (torch.float16, torch.bfloat16):
            return False, f"activation dtype {act_dtype}: the Triton kernels take fp16 or bf16"
        if not _local_groups(layer):
            return (
                False,
                "act-order on a row-parallel shard: its columns use groups of the whole layer",
            )
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "triton is not installed"
        return True, None

    @classmethod
    def prepare(cls, layer: GPTQLayer, act_dtype: torch.dtype) -> TritonBackend:
        from .op import register_op

        # Registered now, at load time: registering while torch.compile traces breaks the graph.
        register_op()
        # A plain k // G order lets the kernels skip the g_idx gather.
        return cls(layer.drop_sequential_g_idx())

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        from .op import dequant_matmul_op

        x2 = x.reshape(-1, x.shape[-1])
        y = dequant_matmul_op(x2, self.layer)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def nbytes(self) -> int:
        t = self.layer
        tensors = [t.qweight, t.qzeros, t.scales, t.g_idx]
        return sum(v.numel() * v.element_size() for v in tensors if v is not None)

    @property
    def keeps_checkpoint_tensors(self) -> bool:
        return True


class _Prepared(LinearBackend):
    """A backend whose prepared form is a callable `kernels` object with `nbytes()`."""

    def __init__(self, prepared: CPUQuantizedLinear | _wna16.WNA16Linear) -> None:
        self.prepared = prepared

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.prepared(x, bias)

    def nbytes(self) -> int:
        return self.prepared.nbytes()


class NativeInt4Backend(_Prepared):
    """This package's AVX512-BF16 kernel for 2/3/4-bit codes (`kernels.cpu_native`)."""

    name = "native-int4"

    @classmethod
    def can_implement(cls, layer: GPTQLayer, act_dtype: torch.dtype) -> tuple[bool, str | None]:
        if layer.qweight.device.type != "cpu":
            return False, f"the layer is on {layer.qweight.device}: the kernel is CPU-only"
        if layer.bits > 4:
            return False, f"bits={layer.bits}: the kernel holds codes below 16"
        if not _local_groups(layer) or group_blocks(layer.full_g_idx, layer.group_size) is None:
            return False, (
                f"the act-order g_idx does not regroup into whole blocks of group_size="
                f"{layer.group_size} columns"
            )
        reason = native_refusal(act_dtype, layer.group_size)
        return (reason is None), reason

    @classmethod
    def prepare(cls, layer: GPTQLayer, act_dtype: torch.dtype) -> NativeInt4Backend:
        return cls(prepare_cpu_linear(layer, act_dtype=act_dtype, path="native"))


class AtenInt4Backend(_Prepared):
    """aten's `_weight_int4pack_mm_for_cpu`: 2/3/4-bit codes in its 4-bit lanes, 8-bit as two
    planes (`kernels.cpu`)."""

    name = "aten-int4"

    @classmethod
    def can_implement(cls, layer: GPTQLayer, act_dtype: torch.dtype) -> tuple[bool, str | None]:
        if layer.qweight.device.type != "cpu":
            return False, f"the layer is on {layer.qweight.device}: aten's int4 matmul is CPU-only"
        if not int4_kernel_available():
            return False, "this torch has no _weight_int4pack_mm_for_cpu (torch >= 2.5 has it)"
        if act_dtype != torch.bfloat16:
            # Measured in docs/serving.md: at fp16/fp32 the kernel is slower than a dense matmul.
            return False, f"activation dtype {act_dtype}: served only with bf16 activations"
        if layer.group_size not in _ATEN_INT4_GROUPS:
            return False, f"group_size={layer.group_size} is not one of {_ATEN_INT4_GROUPS}"
        if not _local_groups(layer) or block_layout(layer.full_g_idx, layer.group_size) is None:
            return False, (
                f"the act-order g_idx does not regroup into whole blocks of group_size="
                f"{layer.group_size} columns"
            )
        return True, None

    @classmethod
    def prepare(cls, layer: GPTQLayer, act_dtype: torch.dtype) -> AtenInt4Backend:
        path = "int4x2" if layer.bits == 8 else "int4"
        return cls(prepare_cpu_linear(layer, act_dtype=act_dtype, path=path))


class WNA16Backend(_Prepared):
    """vLLM's `cpu_gemm_wna16` with 2/3/4-bit codes in its 4-bit lanes (`kernels.wna16`)."""

    name = "wna16"

    @classmethod
    def can_implement(cls, layer: GPTQLayer, act_dtype: torch.dtype) -> tuple[bool, str | None]:
        if not _local_groups(layer):
            return (
                False,
                "act-order on a row-parallel shard: its columns use groups of the whole layer",
            )
        return _wna16.can_implement(layer, act_dtype)

    @classmethod
    def prepare(cls, layer: GPTQLayer, act_dtype: torch.dtype) -> WNA16Backend:
        return cls(_wna16.prepare_wna16(layer, act_dtype=act_dtype))


class DenseBackend(_Prepared):
    """The reference decode once into a dense weight [N, K] in the activation dtype, then
    F.linear. Serves every layer on every device; exact in fp32."""

    name = "dense"

    @classmethod
    def can_implement(cls, layer: GPTQLayer, act_dtype: torch.dtype) -> tuple[bool, str | None]:
        return True, None

    @classmethod
    def prepare(cls, layer: GPTQLayer, act_dtype: torch.dtype) -> DenseBackend:
        return cls(prepare_cpu_linear(layer, act_dtype=act_dtype, path="dense"))


# Tried in this order; the first that can implement a layer serves it. Triton is CUDA-only and
# the others CPU-only, so the order matters between the CPU ones only. CPU rule, from
# benchmarks/results/cpu_linear.md (one torch thread, bf16, SmolLM2 and Llama-3-8B shapes on an
# AVX-512 host without AMX): the native kernel is the fastest quantized path in 23 of 24 cells
# (one tie at M = 1) and 1.5-1.9x bf16 at M = 16, where aten int4 is slower than bf16; aten int4
# beats vLLM's wna16 at M = 1, 4 and 16 (1.9-3.1x at M = 1), wna16 wins only at M = 128 (by 5 %).
# Decode, where serving spends its steps, runs M = number of streams, small. wna16 then serves
# what both int4 paths refuse (fp16 activations, torch < 2.5), dense the rest.
PRIORITY: tuple[type[LinearBackend], ...] = (
    TritonBackend,
    NativeInt4Backend,
    AtenInt4Backend,
    WNA16Backend,
    DenseBackend,
)


@dataclass(frozen=True)
class BackendChoice:
    """The backend `choose_backend` picked, and (name, reason) of every one tried before it."""

    backend: type[LinearBackend]
    rejected: tuple[tuple[str, str], ...]


_logged: set[tuple[object, ...]] = set()


def log_once(key: tuple[object, ...], msg: str, *args: object) -> None:
    """logger.info(msg, *args) the first time `key` is seen in this process: one line per kind of
    layer, not one per layer."""
    if key in _logged:
        return
    _logged.add(key)
    logger.info(msg, *args)


def choose_backend(
    layer: GPTQLayer,
    act_dtype: torch.dtype,
    backends: tuple[type[LinearBackend], ...] = PRIORITY,
    *,
    where: str = "",
) -> BackendChoice:
    """The first of `backends` that can implement `layer` with `act_dtype` activations.

    Logs the choice and the rejected backends' reasons once per layer shape (bits, group size,
    K, N, act-order, dtype, device); raises ValueError with every reason when none accepts.
    """
    rejected: list[tuple[str, str]] = []
    for backend in backends:
        ok, reason = backend.can_implement(layer, act_dtype)
        if ok:
            choice = BackendChoice(backend, tuple(rejected))
            _log_once(layer, act_dtype, choice, where)
            return choice
        rejected.append((backend.name, reason or "no reason given"))
    reasons = "; ".join(f"{name}: {why}" for name, why in rejected)
    raise ValueError(
        f"{where or 'layer'}: no kernel backend can serve this {layer.bits}-bit layer ({reasons})"
    )


def prepare_backend(
    layer: GPTQLayer,
    act_dtype: torch.dtype,
    backends: tuple[type[LinearBackend], ...] = PRIORITY,
    *,
    where: str = "",
) -> LinearBackend:
    """`choose_backend`, then that backend's one-time preparation of the layer."""
    return choose_backend(layer, act_dtype, backends, where=where).backend.prepare(layer, act_dtype)


def _log_once(layer: GPTQLayer, act_dtype: torch.dtype, choice: BackendChoice, where: str) -> None:
    act_order = layer.g_idx is not None and not layer.is_sequential
    key = (
        layer.bits,
        layer.group_size,
        layer.K,
        layer.N,
        act_order,
        act_dtype,
        layer.qweight.device.type,
        choice.backend.name,
        choice.rejected,
    )
    skipped = "; ".join(f"{name}: {why}" for name, why in choice.rejected) or "none"
    log_once(
        key,
        "tsq linear %d-bit g%d K=%d N=%d%s %s (e.g. %s): using %s backend; skipped: %s",
        layer.bits,
        layer.group_size,
        layer.K,
        layer.N,
        " act-order" if act_order else "",
        str(act_dtype).removeprefix("torch."),
        where or "?",
        choice.backend.name,
        skipped,
    )
