"""vLLM linear method for GPTQ-packed tsq layers: parameters, checked loading, CPU/CUDA apply.

Imports vLLM at module level; `tsq_vllm.serve.register()` imports it lazily.

Tensor parallelism. Column-parallel layers split N: `qweight`/`scales` split plainly, `qzeros`
(packed along N) only at whole packing runs, so every output shard must be a multiple of
`run_length(bits)` (8 for int4, 16 for int2, 32 for int3). Row-parallel layers split K: the
`qweight` rows only at whole runs (3-bit packs 32 codes into 3 words, `Fraction(32, 3)`) and the
scales/zeros only at whole groups. With act-order on a row-parallel layer the local columns can
reference any group, so scales/zeros stay whole on every rank (as vLLM's GPTQ did).

Loading is checked by the parameter classes of `tsq_vllm.serve.params`: every tensor's full
checkpoint shape and dtype is verified before vLLM's narrow/copy (whose bare asserts would
otherwise be the only message, or which would silently read a too-large tensor), and after
loading (`_check_complete` here) every shard of a fused layer must have arrived —
vLLM does not track loaded weights for quantized models, so a missing tensor would otherwise
leave uninitialized memory.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, QKVParallelLinear

from ..format.gptq import TENSOR_NAMES, GPTQLayer, check_linear_shape, packed_shapes
from ..format.packing import run_length
from ..kernels.cpu import prepare_cpu_linear
from .params import (
    _CheckedLoad,
    _GIdx,
    _QWeight,
    _ReplicatedScales,
    _ReplicatedZeros,
    _ShardedScales,
    _ShardedZeros,
)

if TYPE_CHECKING:
    from .config import TsqConfig

__all__ = ["TsqLinearMethod", "check_partition"]


def check_partition(
    prefix: str,
    bits: int,
    group_size: int,
    input_size: int,
    input_size_per_partition: int,
    output_partition_sizes: list[int],
    tp_size: int,
) -> None:
    """Raise a ValueError unless the layer, and every tensor-parallel shard of it, can be stored.

    The whole layer must fit the layout (`check_linear_shape`); shards must then hold whole
    groups (row-parallel) and whole packing runs of qzeros (column-parallel).
    """
    try:
        for size in output_partition_sizes:
            check_linear_shape(input_size, size * tp_size, bits, group_size)
    except ValueError as e:
        raise ValueError(
            f"{prefix}: {e}; the checkpoint does not match its quantization_config"
        ) from None
    run = run_length(bits)
    if input_size_per_partition != input_size and input_size_per_partition % group_size:
        raise ValueError(
            f"{prefix}: tensor-parallel size {tp_size} splits in_features={input_size} into "
            f"shards of {input_size_per_partition}, not a multiple of {group_size} (row-parallel "
            f"shards must hold whole groups of {group_size}); use a tensor-parallel size that "
            f"divides {input_size // group_size}"
        )
    for size in output_partition_sizes:
        if size % run:
            raise ValueError(
                f"{prefix}: tensor-parallel size {tp_size} splits an output of "
                f"{size * tp_size} into shards of {size}, not a multiple of {run} ({bits}-bit "
                f"zero points pack {run} values per run); use a smaller tensor-parallel size"
            )


class TsqLinearMethod(LinearMethodBase):
    """GPTQ-layout linear: CPU fast path (`tsq_vllm.kernels.cpu`) or CUDA kernels.

    `layer` is a vLLM linear that this method decorates with `tsq_*` attributes, hence `Any`.
    """

    def __init__(self, quant_config: TsqConfig, prefix: str = "") -> None:
        self.quant_config = quant_config
        self.prefix = prefix

    def create_weights(
        self,
        layer: Any,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        cfg = self.quant_config.spec
        bits, group_size = cfg.bits, cfg.group_size
        tp_size = int(getattr(layer, "tp_size", 1))
        check_partition(
            self.prefix,
            bits,
            group_size,
            input_size,
            input_size_per_partition,
            list(output_partition_sizes),
            tp_size,
        )
        weight_loader: Callable[..., None] | None = extra_weight_attrs.get("weight_loader")
        k_local = input_size_per_partition
        n_local = sum(output_partition_sizes)
        row_parallel = k_local != input_size
        replicate = row_parallel and cfg.desc_act
        n_groups = (input_size if replicate else k_local) // group_size
        pack = Fraction(32, bits)
        # fp16 holds the checkpoint's fp16 scales exactly; fp32 models keep them in fp32.
        scale_dtype = torch.float32 if params_dtype == torch.float32 else torch.float16

        local = packed_shapes(k_local, n_local, bits, n_groups)
        qweight = _QWeight(
            data=torch.empty(local["qweight"], dtype=torch.int32),
            input_dim=0,
            output_dim=1,
            packed_dim=0,
            packed_factor=pack,
            weight_loader=weight_loader,
        )
        zeros_data = torch.empty(local["qzeros"], dtype=torch.int32)
        scales_data = torch.empty(local["scales"], dtype=scale_dtype)
        if replicate:
            qzeros: _CheckedLoad = _ReplicatedZeros(
                data=zeros_data,
                output_dim=1,
                packed_dim=1,
                packed_factor=pack,
                weight_loader=weight_loader,
            )
            scales: _CheckedLoad = _ReplicatedScales(
                data=scales_data, output_dim=1, weight_loader=weight_loader
            )
        else:
            qzeros = _ShardedZeros(
                data=zeros_data,
                input_dim=0,
                output_dim=1,
                packed_dim=1,
                packed_factor=pack,
                weight_loader=weight_loader,
            )
            scales = _ShardedScales(
                data=scales_data, input_dim=0, output_dim=1, weight_loader=weight_loader
            )
        g_idx = _GIdx(
            data=torch.empty(local["g_idx"], dtype=torch.int32),
            input_dim=0,
            weight_loader=weight_loader,
        )

        hint = f"{bits}-bit, group_size {group_size}, in_features={input_size}"
        # Rows of the whole checkpoint tensors (N is checked per shard as it arrives).
        full_rows = {
            k: v[0] for k, v in packed_shapes(input_size, 0, bits, input_size // group_size).items()
        }
        specs: dict[str, tuple[Any, Fraction | None, bool]] = {
            "qweight": (qweight, Fraction(1), True),
            "qzeros": (qzeros, pack, True),
            "scales": (scales, Fraction(1), False),
            "g_idx": (g_idx, None, True),
        }
        for name, (param, out_pack, is_int) in specs.items():
            param.tsq_name = f"{self.prefix}.{name}" if self.prefix else name
            param.tsq_rows = full_rows[name]
            param.tsq_out_pack = out_pack
            param.tsq_int = is_int
            param.tsq_hint = hint
            layer.register_parameter(name, param)
        # vLLM's shard ids for fused layers: "q"/"k"/"v" for QKV, 0..n-1 for merged columns.
        n_shards = len(output_partition_sizes)
        if n_shards == 1:
            layer.tsq_shard_ids = (None,)
        elif isinstance(layer, QKVParallelLinear):
            layer.tsq_shard_ids = ("q", "k", "v")[:n_shards]
        else:
            layer.tsq_shard_ids = tuple(range(n_shards))
        layer.tsq_replicated_groups = replicate
        sharded_groups = row_parallel and not replicate
        layer.tsq_group_offset = (
            int(getattr(layer, "tp_rank", 0)) * n_groups if sharded_groups else 0
        )

    def process_weights_after_loading(self, layer: Any) -> None:
        cfg = self.quant_config.spec
        self._check_complete(layer)
        # Sharded scales hold this rank's groups only, while g_idx keeps global group numbers.
        g_idx = (layer.g_idx.data - int(layer.tsq_group_offset)).to(torch.int32).contiguous()
        gptq = GPTQLayer(
            layer.qweight,
            layer.qzeros,
            layer.scales,
            g_idx,
            bits=cfg.bits,
            group_size=cfg.group_size,
            checkpoint_format=cfg.checkpoint_format,
        )
        try:
            gptq.check_g_idx()
        except ValueError as e:
            if layer.tsq_group_offset:
                raise ValueError(
                    f"{self.prefix} (this rank's shard): {e}; the checkpoint uses act-order "
                    f"but its quantization_config says desc_act=false: set it to true"
                ) from None
            raise ValueError(f"{self.prefix}: {e}; re-export the checkpoint") from None
        try:
            # NaN scales or out-of-range zeros would serve empty or garbage text without any error.
            gptq.check_values(self.prefix)
        except ValueError as e:
            raise ValueError(f"corrupt checkpoint: {e}") from None
        if _uses_cpu_path(layer) or layer.tsq_replicated_groups:
            # Act-order on a row-parallel shard: the local columns index groups of the whole
            # layer, which the kernels cannot tile by group. Decode once into a dense weight.
            path = "dense" if layer.tsq_replicated_groups else None
            layer.tsq_cpu = prepare_cpu_linear(gptq, act_dtype=layer.params_dtype, path=path)
            _drop_packed(layer)
        else:
            # A plain k // G order lets the kernels skip the g_idx gather.
            layer.tsq_gptq = gptq.drop_sequential_g_idx()
            layer.tsq_matmul = _kernel_matmul()

    def _check_complete(self, layer: Any) -> None:
        """Every shard of every tensor must have been loaded.

        vLLM does not check this for quantized models.
        """
        shard_ids: list[Any] = list(layer.tsq_shard_ids)
        names = self.quant_config.shard_names(self.prefix, len(shard_ids))
        for tensor in TENSOR_NAMES:
            loaded: set[Any] = getattr(getattr(layer, tensor), "tsq_loaded", set())
            missing = [
                name for sid, name in zip(shard_ids, names, strict=True) if sid not in loaded
            ]
            if missing:
                which = ", ".join(f"{m}.{tensor}" for m in missing)
                raise ValueError(
                    f"{which} missing from the checkpoint: every quantized linear needs qweight, "
                    f"qzeros, scales and g_idx; the checkpoint is incomplete: re-export it"
                )

    def apply(self, layer: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        prepared = getattr(layer, "tsq_cpu", None)
        if prepared is not None:
            return prepared(x, bias)
        x2 = x.reshape(-1, x.shape[-1])
        y = layer.tsq_matmul(x2, layer.tsq_gptq)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _uses_cpu_path(layer: Any) -> bool:
    """CPU layers get the repacked fast path; every other device the dequant-matmul kernels."""
    return layer.qweight.device.type == "cpu"


def _drop_packed(layer: Any) -> None:
    """Free the checkpoint tensors once a prepared copy runs (halves resident weight memory)."""
    for name in TENSOR_NAMES:
        param = getattr(layer, name)
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)


def _kernel_matmul() -> Callable[..., torch.Tensor]:
    """`tsq::dequant_matmul` (Triton on CUDA, one opaque op for torch.compile) when available.

    Registered here, at load time, because registering while torch.compile traces would break
    the graph.
    """
    from ..kernels import dequant_matmul_op, register_op

    register_op()
    return dequant_matmul_op
