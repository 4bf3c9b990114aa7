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

After loading, `tsq_vllm.kernels.backends.prepare_backend` picks the kernel backend of the layer
(Triton on CUDA; aten int4, vLLM's WNA16 or dense on CPU) and prepares its weights; everything
the method keeps per layer is one `LayerState` at `layer.tsq`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

from ..format.gptq import TENSOR_NAMES, GPTQLayer, check_linear_shape, packed_shapes
from ..format.packing import run_length
from ..kernels.backends import LinearBackend, prepare_backend
from .params import (
    TensorSpec,
    _CheckedLoad,
    _GIdx,
    _QWeight,
    _ReplicatedScales,
    _ReplicatedZeros,
    _ShardedScales,
    _ShardedZeros,
    fused_shard_ids,
)

if TYPE_CHECKING:
    from .config import TsqConfig

__all__ = ["LayerState", "TsqLinearMethod", "check_partition"]


@dataclass
class LayerState:
    """What the tsq linear method keeps on one vLLM layer (`layer.tsq`).

    `shard_ids`: vLLM's shard ids of the fused parts ("q"/"k"/"v", 0..n-1, or (None,));
    `group_offset`: the first group of this rank's scales (row-parallel shards hold their own
    groups, g_idx numbers them globally); `backend`: the prepared kernel, set after loading.
    """

    shard_ids: tuple[Any, ...]
    group_offset: int
    backend: LinearBackend | None = None


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
    """GPTQ-layout linear served by the kernel backend `kernels.backends` chooses per layer.

    `layer` is a vLLM linear that carries this method's `LayerState` as `layer.tsq`, hence `Any`.
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
        if isinstance(layer, VocabParallelEmbedding):
            # A quantized lm_head: vLLM's embedding loader copies along dim 0, not our N dim.
            weight_loader = _vocab_loader(layer)
        k_local = input_size_per_partition
        n_local = sum(output_partition_sizes)
        row_parallel = k_local != input_size
        replicate = row_parallel and cfg.desc_act
        n_groups = (input_size if replicate else k_local) // group_size
        pack = Fraction(32, bits)
        # fp16 holds the checkpoint's fp16 scales exactly; fp32 models keep them in fp32.
        scale_dtype = torch.float32 if params_dtype == torch.float32 else torch.float16

        hint = f"{bits}-bit, group_size {group_size}, in_features={input_size}"
        # Rows of the whole checkpoint tensors (N is checked per shard as it arrives).
        full_rows = {
            k: v[0] for k, v in packed_shapes(input_size, 0, bits, input_size // group_size).items()
        }
        out_packs = {"qweight": Fraction(1), "qzeros": pack, "scales": Fraction(1), "g_idx": None}

        def spec(name: str) -> TensorSpec:
            return TensorSpec(
                name=f"{self.prefix}.{name}" if self.prefix else name,
                rows=full_rows[name],
                out_pack=out_packs[name],
                is_int=name != "scales",
                hint=hint,
            )

        local = packed_shapes(k_local, n_local, bits, n_groups)
        qweight = _QWeight(
            data=torch.empty(local["qweight"], dtype=torch.int32),
            input_dim=0,
            output_dim=1,
            packed_dim=0,
            packed_factor=pack,
            weight_loader=weight_loader,
            tsq_spec=spec("qweight"),
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
                tsq_spec=spec("qzeros"),
            )
            scales: _CheckedLoad = _ReplicatedScales(
                data=scales_data, output_dim=1, weight_loader=weight_loader, tsq_spec=spec("scales")
            )
        else:
            qzeros = _ShardedZeros(
                data=zeros_data,
                input_dim=0,
                output_dim=1,
                packed_dim=1,
                packed_factor=pack,
                weight_loader=weight_loader,
                tsq_spec=spec("qzeros"),
            )
            scales = _ShardedScales(
                data=scales_data,
                input_dim=0,
                output_dim=1,
                weight_loader=weight_loader,
                tsq_spec=spec("scales"),
            )
        g_idx = _GIdx(
            data=torch.empty(local["g_idx"], dtype=torch.int32),
            input_dim=0,
            weight_loader=weight_loader,
            tsq_spec=spec("g_idx"),
        )
        for name, param in zip(TENSOR_NAMES, (qweight, qzeros, scales, g_idx), strict=True):
            layer.register_parameter(name, param)
        sharded_groups = row_parallel and not replicate
        layer.tsq = LayerState(
            shard_ids=fused_shard_ids(layer, len(output_partition_sizes)),
            group_offset=int(getattr(layer, "tp_rank", 0)) * n_groups if sharded_groups else 0,
        )

    def process_weights_after_loading(self, layer: Any) -> None:
        cfg = self.quant_config.spec
        self._check_complete(layer)
        # Sharded scales hold this rank's groups only, while g_idx keeps global group numbers.
        g_idx = (layer.g_idx.data - layer.tsq.group_offset).to(torch.int32).contiguous()
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
            if layer.tsq.group_offset:
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
        # Act-order on a row-parallel shard keeps every group of the layer (`replicate` in
        # create_weights): only the dense backend serves that, the others' can_implement say so.
        backend = prepare_backend(gptq, layer.params_dtype, where=self.prefix)
        layer.tsq.backend = backend
        if not backend.keeps_checkpoint_tensors:
            _drop_packed(layer)

    def _check_complete(self, layer: Any) -> None:
        """Every shard of every tensor must have been loaded.

        vLLM does not check this for quantized models.
        """
        shard_ids: list[Any] = list(layer.tsq.shard_ids)
        names = self.quant_config.shard_names(self.prefix, len(shard_ids))
        for tensor in TENSOR_NAMES:
            loaded: set[Any] = getattr(layer, tensor).tsq_loaded
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
        backend = layer.tsq.backend
        if backend is None:
            raise RuntimeError(f"{self.prefix}: apply before process_weights_after_loading")
        return backend.apply(x, bias)


def _drop_packed(layer: Any) -> None:
    """Free the checkpoint tensors once a prepared copy runs (halves resident weight memory)."""
    for name in TENSOR_NAMES:
        param = getattr(layer, name)
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)


def _vocab_loader(layer: Any) -> Callable[[Any, torch.Tensor], None]:
    """The weight loader of a quantized lm_head (a vLLM `ParallelLMHead`): each rank takes its
    vocabulary shard's columns, and the columns vLLM pads the vocabulary with decode to 0."""
    idx = layer.shard_indices
    start, end = idx.org_vocab_start_index, idx.org_vocab_end_index

    def load(param: Any, loaded_weight: torch.Tensor) -> None:
        param.load_vocab_shard(loaded_weight, start, end - start, layer.org_vocab_size)

    return load
