"""vLLM parameters of the tsq linear method whose loading is checked (`TsqLinearMethod`).

Every tensor's full checkpoint shape and dtype is verified before vLLM's narrow/copy (whose bare
asserts would otherwise be the only message, or which would silently read a too-large tensor),
and each parameter records the shards it received so that `TsqLinearMethod` can verify after
loading that every shard of a fused layer arrived.

Imports vLLM at module level, like `tsq_vllm.serve.linear`.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from vllm.model_executor.layers.linear import QKVParallelLinear
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)

# Private to the serve package: `linear` (and `bcq`, for fused_shard_ids) use these, nothing else.
__all__: list[str] = []


def fused_shard_ids(layer: Any, n_shards: int) -> tuple[Any, ...]:
    """vLLM's shard ids of a layer's fused parts, as the loaders receive them (and `tsq_loaded`
    records them): "q"/"k"/"v" for QKV, 0..n-1 for merged columns, (None,) for a plain layer."""
    if n_shards == 1:
        return (None,)
    if isinstance(layer, QKVParallelLinear):
        return ("q", "k", "v")[:n_shards]
    return tuple(range(n_shards))


@dataclass(frozen=True)
class TensorSpec:
    """What one checkpoint tensor of a tsq linear must look like, for the loading checks.

    `name` is the layer prefix + tensor, `rows` the rows of the full checkpoint tensor,
    `out_pack` the Fraction its N dim is packed by (None for the 1-D g_idx), `is_int` whether
    int32 is expected (else a float dtype), `hint` the config, for messages.
    """

    name: str
    rows: int
    out_pack: Fraction | None
    is_int: bool
    hint: str


class _CheckedLoad:
    """Mixin for vLLM parameters: verify the checkpoint tensor, then let vLLM shard and copy it.

    Built with `tsq_spec=TensorSpec(...)`; `tsq_loaded` collects the shard ids loaded so far.
    """

    tsq_spec: TensorSpec
    tsq_loaded: set[Any]
    # Provided by the vLLM parameter class this is mixed into.
    data: torch.Tensor
    tp_size: int

    # vLLM's BasevLLMParameter.__new__ takes and ignores keyword arguments, tsq_spec included.
    def __init__(self, *, tsq_spec: TensorSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tsq_spec = tsq_spec
        self.tsq_loaded = set()

    def _tsq_expect(self, loaded: torch.Tensor, out_full: int | None, shard: Any) -> None:
        spec = self.tsq_spec
        where = spec.name + ("" if shard is None else f" (shard {shard!r})")
        ok_dtype = loaded.dtype == torch.int32 if spec.is_int else loaded.dtype.is_floating_point
        if not ok_dtype:
            want = "int32" if spec.is_int else "a float dtype"
            raise ValueError(
                f"{where}: checkpoint tensor has dtype {loaded.dtype}, expected {want}; "
                f"the checkpoint is corrupt or not GPTQ-packed: re-export it"
            )
        expected: tuple[int | str, ...] = (spec.rows,)
        if spec.out_pack is not None:
            cols = None if out_full is None else Fraction(out_full) / spec.out_pack
            expected = (spec.rows, "N" if cols is None or cols.denominator != 1 else int(cols))
        shape = tuple(loaded.shape)
        if len(shape) != len(expected) or any(
            isinstance(e, int) and s != e for s, e in zip(shape, expected, strict=True)
        ):
            raise ValueError(
                f"{where}: checkpoint tensor has shape {shape}, expected {expected} for "
                f"{spec.hint}; the tensors do not match the checkpoint's quantization_config "
                f"(wrong bits or group_size) or the file is corrupt: re-export the checkpoint"
            )

    def _tsq_mark(self, shard: Any) -> None:
        self.tsq_loaded.add(shard)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        out = getattr(self, "output_dim", None)
        full = None if out is None else _unpacked_cols(self, self.data.shape[out]) * self.tp_size
        self._tsq_expect(loaded_weight, full, None)
        super().load_column_parallel_weight(loaded_weight)  # type: ignore[misc]
        self._tsq_mark(None)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        full = None if self.data.ndim == 1 else _unpacked_cols(self, self.data.shape[1])
        self._tsq_expect(loaded_weight, full, None)
        super().load_row_parallel_weight(loaded_weight)  # type: ignore[misc]
        self._tsq_mark(None)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs: Any) -> None:
        shard = kwargs.get("shard_id")
        size = kwargs.get("shard_size")
        full = None if size is None or self.data.ndim == 1 else size * self.tp_size
        self._tsq_expect(loaded_weight, full, shard)
        self._tsq_before_shard(loaded_weight, shard)
        super().load_merged_column_weight(loaded_weight, **kwargs)  # type: ignore[misc]
        self._tsq_mark(shard)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs: Any) -> None:
        shard = kwargs.get("shard_id")
        size = kwargs.get("shard_size")
        full = None
        if size is not None and self.data.ndim == 2:
            # k/v heads are replicated when tp_size > kv heads: num_heads is the replica count.
            full = size * self.tp_size // (1 if shard == "q" else kwargs.get("num_heads", 1))
        self._tsq_expect(loaded_weight, full, shard)
        self._tsq_before_shard(loaded_weight, shard)
        super().load_qkv_weight(loaded_weight, **kwargs)  # type: ignore[misc]
        self._tsq_mark(shard)

    def load_vocab_shard(
        self, loaded_weight: torch.Tensor, start: int, size: int, full: int
    ) -> None:
        """A vocab-parallel lm_head's shard: output columns [start, start + size) of a tensor of
        `full` columns go to the front of this parameter; the padding columns after them get
        code 0, scale 0 (their logits are 0, and vLLM slices them off)."""
        out = getattr(self, "output_dim", None)
        self._tsq_expect(loaded_weight, None if out is None else full, None)
        if out is None:  # g_idx: the same for every shard
            self.data.copy_(loaded_weight)
        else:
            pack = self.tsq_spec.out_pack or Fraction(1)
            first, cols = Fraction(start) / pack, Fraction(size) / pack
            # create_weights' check_partition makes shards start and end on whole packing runs.
            assert first.denominator == cols.denominator == 1, (start, size, pack)
            piece = loaded_weight.narrow(out, int(first), int(cols))
            self.data.narrow(out, 0, int(cols)).copy_(piece)
            self.data.narrow(out, int(cols), self.data.shape[out] - int(cols)).zero_()
        self._tsq_mark(None)

    def _tsq_before_shard(self, loaded_weight: torch.Tensor, shard: Any) -> None:
        """Hook for per-shard consistency checks (g_idx); nothing by default."""


def _unpacked_cols(param: Any, cols: int) -> int:
    """Output columns a parameter's N dim stands for (qzeros pack N by Fraction(32, bits))."""
    pack = param.tsq_spec.out_pack
    return int(cols * pack) if pack is not None and pack != 1 else cols


class _QWeight(_CheckedLoad, PackedvLLMParameter):
    pass


class _ShardedZeros(_CheckedLoad, PackedvLLMParameter):
    pass


class _ReplicatedZeros(_CheckedLoad, PackedColumnParameter):
    pass


class _ShardedScales(_CheckedLoad, GroupQuantScaleParameter):
    pass


class _ReplicatedScales(_CheckedLoad, ChannelQuantScaleParameter):
    pass


class _GIdx(_CheckedLoad, RowvLLMParameter):
    """g_idx: one activation order per fused layer (q/k/v and gate/up share their input)."""

    def _tsq_before_shard(self, loaded_weight: torch.Tensor, shard: Any) -> None:
        if self.tsq_loaded and not torch.equal(self.data, loaded_weight.to(self.data.dtype)):
            raise ValueError(
                f"{self.tsq_spec.name} (shard {shard!r}): g_idx differs from the other shards of "
                f"this fused layer; fused projections need one activation order (GPTQ gives "
                f"layers with the same input the same order): re-quantize with a shared order or "
                f"without act-order"
            )
